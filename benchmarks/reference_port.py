"""A naive eager port of the reference implementation's formulas, as the benchmarks' baseline.

Every call searches the FM time in a 1001-entry table (alphabar = 1 prepended), interpolates a fractional
index, looks alpha and sigma up at that index, forms x_t, the network input z, the implied data and noise
predictions and their difference, and lets autograd differentiate it all: about eight elementwise
passes forward and as many backward. Written from the method's description; it is not d2f's code path.
"""

import torch


class ReferencePort:
    def __init__(self, alphas_cumprod):
        ac = torch.cat([torch.ones(1, dtype=torch.float64), torch.tensor(alphas_cumprod, dtype=torch.float64)])
        self.sqrt_ac = ac.sqrt().float()
        self.sqrt_1m_ac = (1 - ac).sqrt().float()
        # FM time of each table entry, flipped to ascending for searchsorted.
        self.t_ascending = (self.sqrt_ac / (self.sqrt_ac + self.sqrt_1m_ac)).flip(0).contiguous()

    def to(self, device):
        self.sqrt_ac, self.sqrt_1m_ac, self.t_ascending = (
            v.to(device) for v in (self.sqrt_ac, self.sqrt_1m_ac, self.t_ascending)
        )
        return self

    def _lookup(self, table, index):
        lo = index.floor().long().clamp(0, table.numel() - 2)
        frac = index - lo
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def alpha_sigma(self, t):
        n = self.t_ascending.numel()
        hi = torch.searchsorted(self.t_ascending, t).clamp(1, n - 1)
        lo_t, hi_t = self.t_ascending[hi - 1], self.t_ascending[hi]
        index = (n - 1) - ((hi - 1) + (t - lo_t) / (hi_t - lo_t))
        alpha = self._lookup(self.sqrt_ac, index).view(-1, 1, 1, 1)
        sigma = self._lookup(self.sqrt_1m_ac, index).view(-1, 1, 1, 1)
        return alpha, sigma

    def velocity(self, v_pred, x_t, alpha, sigma):
        z = (alpha + sigma) * x_t
        data_hat = alpha * z - sigma * v_pred
        noise_hat = sigma * z + alpha * v_pred
        return data_hat - noise_hat

    def v_loss(self, v_pred, data, noise, t):
        alpha, sigma = self.alpha_sigma(t)
        tb = t.view(-1, 1, 1, 1)
        data, noise, v_pred = data.float(), noise.float(), v_pred.float()
        x_t = tb * data + (1 - tb) * noise
        velocity = self.velocity(v_pred, x_t, alpha, sigma)
        return ((velocity - (data - noise)) ** 2).mean()

    def cfg_euler_step(self, x, v_uncond, v_cond, t, t_next, g):
        v = v_uncond.float() + g * (v_cond.float() - v_uncond.float())
        alpha, sigma = self.alpha_sigma(t)
        x_new = x + (t_next - t).view(-1, 1, 1, 1) * self.velocity(v, x, alpha, sigma)
        alpha_next, sigma_next = self.alpha_sigma(t_next)
        return x_new, ((alpha_next + sigma_next) * x_new).to(v_uncond.dtype)
