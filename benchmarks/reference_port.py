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

    def _lookup(self, table, index):
        lo = index.floor().long().clamp(0, table.numel() - 2)
        frac = index - lo
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def v_loss(self, v_pred, data, noise, t):
        n = self.t_ascending.numel()
        hi = torch.searchsorted(self.t_ascending, t).clamp(1, n - 1)
        lo_t, hi_t = self.t_ascending[hi - 1], self.t_ascending[hi]
        index = (n - 1) - ((hi - 1) + (t - lo_t) / (hi_t - lo_t))
        alpha = self._lookup(self.sqrt_ac, index).view(-1, 1, 1, 1)
        sigma = self._lookup(self.sqrt_1m_ac, index).view(-1, 1, 1, 1)
        tb = t.view(-1, 1, 1, 1)
        x_t = tb * data + (1 - tb) * noise
        z = (alpha + sigma) * x_t
        data_hat = alpha * z - sigma * v_pred
        noise_hat = sigma * z + alpha * v_pred
        velocity = data_hat - noise_hat
        return ((velocity - (data - noise)) ** 2).mean()
