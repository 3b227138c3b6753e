"""D2FScheduler inside diffusers pipelines: a tiny Stable Diffusion and tiny unconditional DDPM/DDIM pipelines,
built locally from configs."""

import re

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
)

import d2f  # noqa: E402
from d2f import D2FScheduler, Schedule  # noqa: E402
from nets import tiny_unet  # noqa: E402
from pipelines import SD_CONFIG, SD_SCHEDULE, tiny_pipeline  # noqa: E402


def run(pipe, steps=10, guidance=1.0, **kwargs):
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 3, 12, generator=g)
    negative = torch.zeros(2, 3, 12)
    out = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
        **({} if "image" in kwargs else {"height": 8, "width": 8}),  # img2img takes the image's size
        **kwargs,
    )
    return out.images


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    "spacing_config",
    [
        dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),  # SD 1.x / 2.x
        dict(timestep_spacing="trailing", set_alpha_to_one=True),
        dict(timestep_spacing="trailing", set_alpha_to_one=False),
    ],
    ids=["leading", "trailing-alpha1", "trailing"],
)
@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_swapping_in_d2f_reproduces_ddim_in_the_pipeline(prediction_type, spacing_config, guidance):
    pipe = tiny_pipeline(prediction_type, **spacing_config)
    ddim = run(pipe, guidance=guidance)
    pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == prediction_type
    d2f = run(pipe, guidance=guidance)
    torch.testing.assert_close(d2f, ddim, rtol=1e-4, atol=1e-4)


def test_linspace_spacing_step_table_reproduces_ddim():
    pipe = tiny_pipeline("v_prediction", timestep_spacing="linspace", set_alpha_to_one=False)
    ddim = run(pipe, steps=7)
    pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config)
    torch.testing.assert_close(run(pipe, steps=7), ddim, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", ["heun", "midpoint"])
@pytest.mark.parametrize("grid", ["ddim", "uniform", "shift"])
def test_second_order_solvers_and_fm_grids_run_in_the_pipeline(solver, grid):
    pipe = tiny_pipeline("v_prediction", timestep_spacing="trailing")
    pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config, solver=solver, grid=grid)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(4)
    assert scheduler.order == 2 and len(scheduler.timesteps) == 8 and scheduler.timesteps.dtype == torch.float32
    latents = run(pipe, steps=4, guidance=3.0)
    assert latents.shape == (2, 4, 8, 8) and bool(latents.isfinite().all())


def test_scheduler_semantics():
    scheduler = D2FScheduler.from_config(DDIMScheduler(**SD_CONFIG, steps_offset=1, set_alpha_to_one=False).config)
    scheduler.set_timesteps(10)
    schedule = Schedule.scaled_linear()
    # Network timesteps: exactly DDIM's integers, as floats.
    assert scheduler.timesteps.tolist() == [float(k) for k in range(901, 0, -100)]
    # The latents are DDIM's (the network's input): the start is the noise itself and nothing rescales it.
    assert scheduler.init_noise_sigma == 1.0
    x = torch.ones(1, 4, 2, 2)
    assert scheduler.scale_model_input(x, scheduler.timesteps[0]) is x
    data, noise = torch.full((1, 4, 2, 2), 2.0), torch.zeros(1, 4, 2, 2)
    noisy = scheduler.add_noise(data, noise, torch.tensor([301.0]))
    torch.testing.assert_close(noisy, torch.full_like(data, 2 * float(schedule.alphas_cumprod[301]) ** 0.5))
    torch.testing.assert_close(scheduler.scale_noise(data, torch.tensor([301.0]), noise), noisy)
    assert len(scheduler) == 1000


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "multistep"])
def test_pred_original_sample_is_the_clean_latent_of_each_evaluation(solver):
    """``x + (1 - t) * u`` at the FM state ``x = latent / scale(t)`` the network saw: for a two-stage step's
    second evaluation that is the predictor the pipeline passed in, as diffusers' own Heun scheduler does."""
    from d2f import diffusion_to_velocity, scale

    scheduler = D2FScheduler.from_config(DDIMScheduler(**SD_CONFIG, prediction_type="epsilon").config, solver=solver)
    scheduler.set_timesteps(3)
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 4, 2, 2, generator=g)
    for k in scheduler.timesteps:
        t = scheduler._evaluations[scheduler._step_index or 0].t
        out = torch.randn(1, 4, 2, 2, generator=g)
        step = scheduler.step(out, k, latent)
        x = latent / float(scale(t))
        u = diffusion_to_velocity(out, x, t, "epsilon")
        torch.testing.assert_close(step.pred_original_sample, x + (1 - t) * u)
        latent = step.prev_sample


@pytest.mark.parametrize("kind", ["text2img", "img2img"])
def test_bfloat16_pipelines_with_eta_and_a_generator_give_ddims_images(kind):
    """The stochastic DDIM step (eta = 1) through whole bf16 pipelines on the CPU, the same generator for both:
    the pipeline hands the step its eta and generator, D2F draws what DDIM draws, and every tensor stays bf16
    (add_noise included, which img2img's bf16 VAE latents go through)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = tiny_pipeline("v_prediction", steps_offset=1, set_alpha_to_one=False, clip_sample=True)
    if kind == "img2img":
        pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(torch.bfloat16)
    extra = {"image": torch.rand(2, 3, 8, 8).bfloat16(), "strength": 0.7} if kind == "img2img" else {}
    ddim = run(pipe, guidance=3.0, eta=1.0, **extra)
    pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config)
    d2f = run(pipe, guidance=3.0, eta=1.0, **extra)
    assert d2f.dtype == ddim.dtype == torch.bfloat16
    # bf16 keeps 8 bits; DDIM rounds each of its operations to bf16, d2f computes the step in float32.
    torch.testing.assert_close(d2f.float(), ddim.float(), rtol=0.05, atol=0.05)


def test_img2img_begins_part_way():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = tiny_pipeline("epsilon", steps_offset=1, set_alpha_to_one=False)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 8, 8)
    ddim = run(img2img, image=image, strength=0.6)
    img2img.scheduler = D2FScheduler.from_config(img2img.scheduler.config)
    torch.testing.assert_close(run(img2img, image=image, strength=0.6), ddim, rtol=1e-4, atol=1e-4)
    # A flow model's two calls are one midpoint step, which has no half-way start.
    img2img.scheduler = D2FScheduler.from_config(img2img.scheduler.config, solver="auto", flow_finetuned=True)
    with pytest.raises(
        ValueError, match=r"begin_index=1 .* solver='auto' \(which took midpoint for 2 network calls\) cannot start"
    ):
        run(img2img, steps=2, image=image, strength=0.5)
    assert run(img2img, steps=3, image=image, strength=0.5).isfinite().all()
    img2img.scheduler = D2FScheduler.from_config(img2img.scheduler.config, solver="heun")
    with pytest.raises(ValueError, match="begin_index=1 falls inside a two-stage heun step; .* order=2"):
        img2img.scheduler.set_timesteps(2)
        img2img.scheduler.set_begin_index(1)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="solver='rk4' is not supported"):
        D2FScheduler(solver="rk4")
    with pytest.raises(ValueError, match="grid='karras' is not supported"):
        D2FScheduler(grid="karras")
    zero_snr_eps = D2FScheduler(**SD_SCHEDULE, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match=r"^the grid starts at t=0.0, where prediction_type='epsilon' has no velocity"):
        zero_snr_eps.set_timesteps(10)
    scheduler = D2FScheduler(**SD_SCHEDULE)
    with pytest.raises(ValueError, match=r"^call set_timesteps\(num_inference_steps\) before sampling$"):
        scheduler.step(torch.zeros(1, 1), 0, torch.zeros(1, 1))
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        scheduler.step(torch.zeros(1, 1), 3.5, torch.zeros(1, 1))
    for k in scheduler.timesteps:
        scheduler.step(torch.zeros(1, 1), k, torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"^step\(\) was called more often than set_timesteps planned$"):
        scheduler.step(torch.zeros(1, 1), scheduler.timesteps[-1], torch.zeros(1, 1))


def test_step_returns_both_samples_in_the_samples_dtype():
    """The step works in float32 for a float16 latent; the pipeline gets both results back in float16."""
    scheduler = D2FScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8).half()
    out = scheduler.step(torch.randn_like(x), scheduler.timesteps[0], x)
    assert out.prev_sample.dtype == out.pred_original_sample.dtype == torch.float16


BOOLEAN_KEYS = ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr")


@pytest.mark.parametrize("route", ["constructor", "from_config"])
@pytest.mark.parametrize("value", ["false", "no", 0, None])
@pytest.mark.parametrize("key", BOOLEAN_KEYS)
def test_boolean_config_keys_must_be_bools(key, value, route):
    """A config's "false" is truthy: taken as given it would switch the option on."""
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r} must be True or False")):
        if route == "constructor":
            D2FScheduler(**{key: value})
        else:
            D2FScheduler.from_config({"_class_name": "DDIMScheduler", key: value})  # a scheduler_config.json


def test_trained_betas_must_be_one_table_as_long_as_num_train_timesteps():
    betas = np.linspace(1e-4, 0.02, 50)
    want = Schedule.from_betas(betas, "epsilon")
    for table in (betas, betas.tolist(), torch.from_numpy(betas)):
        assert D2FScheduler(trained_betas=table, num_train_timesteps=50).schedule == want
    with pytest.raises(
        ValueError, match=re.escape("trained_betas must be a non-empty 1-D table of betas, got shape (5, 10)")
    ):
        D2FScheduler(trained_betas=betas.reshape(5, 10), num_train_timesteps=50)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "trained_betas must be in (0, 1), the last one may be 1 (zero terminal SNR); trained_betas[1]=nan"
        ),
    ):
        D2FScheduler(trained_betas=[0.1, float("nan")], num_train_timesteps=2)
    message = "num_train_timesteps=1000 disagrees with trained_betas, which has 50 entries; pass num_train_timesteps=50"
    with pytest.raises(ValueError, match=message):
        D2FScheduler(trained_betas=betas)
    ddim = DDIMScheduler(trained_betas=betas.tolist())
    assert len(ddim.betas) == 50 and ddim.config.num_train_timesteps == 1000  # DDIM drops the disagreement silently
    with pytest.raises(ValueError, match=message):
        D2FScheduler.from_config(ddim.config)


def unconditional(pipeline_class, scheduler):
    torch.manual_seed(0)
    pipe = pipeline_class(unet=tiny_unet(3, 3), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps=3, **kwargs):
    return pipe(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="np", **kwargs
    ).images


def d2f_reference(unet, scheduler, steps=3, solver=None, grid=None, clip=None):
    """``d2f.sample`` of the same network from the pipeline's noise on the scheduler's grid and solver (or the
    ones given), turned into the pipeline's ``np`` images: what the scheduler must give inside the pipeline.
    ``clip``: sample the velocity of the clipped clean sample instead, ``(clip(x + (1-t)*u) - x) / (1-t)``."""
    cfg = scheduler.config
    schedule = Schedule.from_diffusers(cfg)
    ts = d2f.sampling_grid(
        grid or cfg.grid or "ddim",
        steps,
        schedule,
        cfg.prediction_type,
        cfg.shift,
        cfg.timestep_spacing,
        cfg.steps_offset,
        cfg.set_alpha_to_one,
        cfg.t_min,
    )
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the pipeline's draw
    field = d2f.D2FVelocity(unet, schedule, cfg.prediction_type)
    with torch.no_grad():
        if clip is None:
            x = field.sample(noise, ts, solver=solver or cfg.solver)
        else:

            def clipped(x, t):
                return (clip(x + (1 - t) * field(x, t)) - x) / (1 - t)

            clipped.singular_times = (*field.singular_times, 1.0)
            x = d2f.sample(clipped, noise / d2f.scale(float(ts[0])), ts, solver=solver or cfg.solver)
    latent = d2f.scale(float(ts[-1])) * x
    return (latent / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


V_CONFIG = dict(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")


def test_ddpm_pipeline_samples_with_d2f():
    """DDPMPipeline neither multiplies its noise by init_noise_sigma nor calls scale_model_input, and calls
    step(output, t, image, generator=generator): it works because the latents are DDIM's. With DDPM's own config
    (clip_sample on) D2F gives DDIM's images; with Heun on a shifted grid, d2f.sample's."""
    ddim = generate(unconditional(DDPMPipeline, DDIMScheduler.from_config(DDPMScheduler().config)))
    pipe = unconditional(DDPMPipeline, D2FScheduler.from_config(DDPMScheduler().config))
    np.testing.assert_allclose(generate(pipe), ddim, rtol=0, atol=1e-5)
    pipe.scheduler = D2FScheduler(**V_CONFIG, solver="heun", grid="shift")
    np.testing.assert_allclose(generate(pipe), d2f_reference(pipe.unet, pipe.scheduler), rtol=0, atol=1e-5)


# google/ddpm-cifar10-32's scheduler_config.json, as a DDPMPipeline folder holds it: DDPM's keys, clipping on.
DDPM_PIPELINE_CONFIG = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}


def d2f_scheduler(source, **settings):
    """D2FScheduler from the class defaults, from ``DDIMScheduler()``'s default config or from a DDPM pipeline's."""
    if source == "defaults":
        return D2FScheduler(**settings)
    return D2FScheduler.from_config(DDIMScheduler().config if source == "ddim" else DDPM_PIPELINE_CONFIG, **settings)


@pytest.mark.parametrize("source", ["defaults", "ddim", "ddpm-pipeline"])
@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "multistep", "auto"])
def test_every_solver_samples_from_ddims_defaults_with_clipping(solver, source):
    """clip_sample=True is DDIM's default: every solver honours it in a full pipeline loop, and it acts."""
    pipe = unconditional(DDPMPipeline, d2f_scheduler(source, solver=solver))
    assert pipe.scheduler.config.clip_sample
    images = generate(pipe, 4)
    assert np.isfinite(images).all()
    pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    assert np.abs(images - generate(pipe, 4)).max() > 1e-2


@pytest.mark.parametrize("key", ["clip_sample", "thresholding"])
@pytest.mark.parametrize(("solver", "grid"), [("heun", "ddim"), ("midpoint", "uniform"), ("multistep", "shift")])
def test_fm_solvers_take_the_velocity_of_the_clipped_clean_sample(solver, grid, key):
    """At every network call the predicted clean sample D is clipped (or thresholded) as DDIM clips it, and the
    solver takes the velocity (D_c - x) / (1 - t) (docs/conventions.md §5): the pipeline's images are d2f.sample's
    of that velocity. Heun's last step, which would evaluate at t = 1 where it has no value, is Euler."""
    config = {**DDPM_PIPELINE_CONFIG, "clip_sample": key == "clip_sample", "thresholding": key == "thresholding"}
    pipe = unconditional(DDPMPipeline, D2FScheduler.from_config(config, solver=solver, grid=grid))
    clip = pipe.scheduler._clip
    expected = d2f_reference(pipe.unet, pipe.scheduler, 4, clip=clip)
    # 1e-4: the pipeline rounds its latent to float32 at every call, and at DDPM's t_min = 0.0064 an epsilon
    # network's velocity magnifies that rounding 1/t times.
    np.testing.assert_allclose(generate(pipe, 4), expected, rtol=0, atol=1e-4)
    assert np.abs(expected - d2f_reference(pipe.unet, pipe.scheduler, 4)).max() > 1e-2  # the clip acted


def test_get_velocity_and_scale_model_input_are_ddims():
    """diffusers' training scripts call get_velocity for v-prediction targets; its scheduler API test calls
    scale_model_input(sample, 0.0) before set_timesteps."""
    g = torch.Generator().manual_seed(3)
    sample, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 501, 999])
    for config in (SD_CONFIG, DDPM_PIPELINE_CONFIG):
        ddim, ours = DDIMScheduler.from_config(config), D2FScheduler.from_config(config)
        want = ddim.get_velocity(sample, noise, timesteps)
        # 1e-5: DDIM's alphas_cumprod is a float32 cumprod, d2f's a float64 table
        torch.testing.assert_close(ours.get_velocity(sample, noise, timesteps), want, rtol=1e-5, atol=1e-5)
        assert ours.get_velocity(sample.half(), noise.half(), timesteps).dtype == torch.float16
        assert ours.scale_model_input(sample, 0.0) is sample
    ours.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep 3.5 is not one of this scheduler's timesteps"):
        ours.scale_model_input(sample, 3.5)


def test_fm_grids_start_at_t_min():
    """Unset, the uniform and shift grids start where a converted network was trained, timestep T-1; an export
    of a flow-finetuned network writes its own t_min into its scheduler config."""
    scheduler = D2FScheduler(**V_CONFIG, grid="uniform")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[0] == 999
    scheduler = D2FScheduler(**V_CONFIG, grid="shift", t_min=0.0)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[0] == 1000 and scheduler._steps[0][0] == 0.0
    for bad in (1.0, -0.1, "0", True):
        with pytest.raises(ValueError, match=re.escape(f"t_min={bad!r} must be None")):
            D2FScheduler(t_min=bad)


@pytest.mark.parametrize("grid", ["ddim", "uniform", "shift"])
def test_multistep_in_a_pipeline_is_d2f_sample(grid):
    """One network call per step, Euler first and Adams-Bashforth after: the pipeline's images are
    d2f.sample's (and so the fused kernel's, test_kernels) for every grid (DDIM's leading steps: 3 steps of
    trailing spacing do not chain)."""
    config = {**V_CONFIG, "timestep_spacing": "leading"}
    pipe = unconditional(DDPMPipeline, D2FScheduler(**config, solver="multistep", grid=grid))
    pipe.scheduler.set_timesteps(3)
    assert pipe.scheduler.order == 1 and len(pipe.scheduler.timesteps) == 3
    images = generate(pipe)
    np.testing.assert_allclose(images, d2f_reference(pipe.unet, pipe.scheduler), rtol=0, atol=1e-5)
    euler = generate(unconditional(DDPMPipeline, D2FScheduler(**config, grid=grid)))
    assert np.abs(images - euler).max() > 1e-3  # the history is used


@pytest.mark.parametrize("flow_finetuned", [False, True])
@pytest.mark.parametrize("calls", [1, 2, 3])
def test_auto_samples_with_the_tables_sampler_in_a_pipeline(calls, flow_finetuned):
    """solver="auto": num_inference_steps network calls of d2f.auto_sampler's sampler (one midpoint step at two
    calls after flow finetuning), order 1 so the pipeline counts calls; a grid that is set is kept."""
    pipe = unconditional(DDPMPipeline, D2FScheduler(**V_CONFIG, solver="auto", flow_finetuned=flow_finetuned))
    solver, grid, steps = d2f.auto_sampler(calls, flow_finetuned)
    pipe.scheduler.set_timesteps(calls)
    assert pipe.scheduler.order == 1 and len(pipe.scheduler.timesteps) == calls
    expected = d2f_reference(pipe.unet, pipe.scheduler, steps, solver, grid)
    np.testing.assert_allclose(generate(pipe, calls), expected, rtol=0, atol=1e-5)
    pipe.scheduler = D2FScheduler(**V_CONFIG, solver="auto", grid="shift", flow_finetuned=flow_finetuned)
    expected = d2f_reference(pipe.unet, pipe.scheduler, steps, solver, "shift")
    np.testing.assert_allclose(generate(pipe, calls), expected, rtol=0, atol=1e-5)


def test_auto_refuses_what_only_euler_does():
    scheduler = D2FScheduler(**V_CONFIG, solver="auto")
    scheduler.set_timesteps(3)
    with pytest.raises(
        ValueError, match=r"eta=1.0 makes .*solver='auto' \(which took multistep for 3 network calls\) needs eta=0"
    ):
        scheduler.step(torch.zeros(1, 3, 4, 4), scheduler.timesteps[0], torch.zeros(1, 3, 4, 4), eta=1.0)
    with pytest.raises(ValueError, match="flow_finetuned='yes' must be True or False"):
        D2FScheduler(**V_CONFIG, solver="auto", flow_finetuned="yes")


def test_multistep_refuses_a_ddim_step_table_with_gaps():
    scheduler = D2FScheduler(**V_CONFIG, solver="multistep")
    with pytest.raises(ValueError, match="solver='multistep' needs steps that chain.*'trailing' and 7 steps has gaps"):
        scheduler.set_timesteps(7)
    scheduler.set_timesteps(8)  # 8 divides 1000: DDIM's trailing steps chain


def test_ddim_pipeline_constructor_turns_any_scheduler_into_ddim(tmp_path):
    """diffusers' DDIMPipeline runs DDIMScheduler.from_config(scheduler.config) in its constructor, which
    from_pretrained goes through too: a D2FScheduler handed to either is silently replaced. If diffusers stops
    doing this, the README's advice to assign the scheduler after construction can be relaxed."""
    pipe = unconditional(DDIMPipeline, D2FScheduler(**V_CONFIG, solver="heun"))
    assert type(pipe.scheduler) is DDIMScheduler
    pipe.save_pretrained(tmp_path)
    loaded = DDIMPipeline.from_pretrained(tmp_path, scheduler=D2FScheduler(**V_CONFIG, solver="heun"))
    assert type(loaded.scheduler) is DDIMScheduler


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_samples_with_d2f_assigned_after_construction(eta):
    """pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config) after construction sticks, and the
    pipeline hands the step its eta and generator: DDIM's images on the DDIM grid; on a uniform FM grid others
    (d2f.sample's for eta = 0)."""
    pipe = unconditional(DDIMPipeline, DDIMScheduler(**V_CONFIG))
    ddim = generate(pipe, eta=eta)
    pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, D2FScheduler)
    np.testing.assert_allclose(generate(pipe, eta=eta), ddim, rtol=0, atol=1e-5)
    pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config, grid="uniform")
    fm = generate(pipe, eta=eta)
    assert np.abs(fm - ddim).max() > 1e-2
    if eta == 0:
        np.testing.assert_allclose(fm, d2f_reference(pipe.unet, pipe.scheduler), rtol=0, atol=1e-5)


def manual_loop(unet, scheduler, noise, steps, labels):
    """The standard diffusers sampling loop, written out as users write it."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
            x = scheduler.step(out, t, x).prev_sample
    return x


def test_exports_load_with_standard_calls_and_sample_with_the_scheduler(tmp_path):
    """LoRA: PeftModel.from_pretrained restores the adapter and the fully trained conv_in/conv_out; a full
    finetune loads with from_pretrained; both sample with the export's D2FScheduler like d2f.load does."""
    pytest.importorskip("peft")
    from diffusers import UNet2DModel
    from peft import PeftModel

    import d2f
    from d2f.networks.teachers import teacher_path
    from d2f.training.config import TrainConfig
    from d2f.training.loop import train

    small = dict(resolution=16, batch_size=4, max_steps=3, num_samples=2, sample_steps=2, warmup_steps=1)
    train(TrainConfig.teacher_task(out=str(tmp_path / "lora"), lora_rank=4, **small), progress=False)
    train(TrainConfig.teacher_task(out=str(tmp_path / "full"), lora_rank=0, **small), progress=False)
    teacher = UNet2DModel.from_pretrained(teacher_path() / "unet")
    noise, labels = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([4, 9])

    lora = PeftModel.from_pretrained(
        UNet2DModel.from_pretrained(teacher_path() / "unet"), tmp_path / "lora/export/adapter"
    )
    lora_unet = lora.get_base_model().eval()
    assert not torch.equal(lora_unet.conv_in.weight, teacher.conv_in.weight)
    assert not torch.equal(lora_unet.conv_out.weight, teacher.conv_out.weight)
    full_unet = UNet2DModel.from_pretrained(tmp_path / "full/export/unet").eval()
    assert not torch.equal(full_unet.conv_in.weight, teacher.conv_in.weight)

    for name, unet in (("lora", lora_unet), ("full", full_unet)):
        scheduler = D2FScheduler.from_pretrained(tmp_path / name / "export/scheduler")
        x = manual_loop(unet, scheduler, noise, 6, labels)
        field = d2f.load(tmp_path / name / "export")
        ts = d2f.ddim_grid(field.schedule, 6, "leading", steps_offset=1, set_alpha_to_one=False)
        expected = d2f.scale(float(ts[-1])) * field.sample(noise, ts, class_labels=labels)
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


def test_readme_pipeline_snippet_runs_on_a_tiny_local_pipeline(tmp_path):
    """The README's StableDiffusionPipeline snippet, executed as written against a tiny saved pipeline."""
    import re
    from pathlib import Path

    from pipelines import tiny_sd_pipeline

    tiny_sd_pipeline(tmp_path / "sd")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- snippet: sd-pipeline.*?-->\s*```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(block.replace("path/to/stable-diffusion", str(tmp_path / "sd")), namespace)
    assert namespace["image"].size == (8, 8)
    assert isinstance(namespace["pipe"].scheduler, D2FScheduler) and namespace["pipe"].scheduler.config.solver == "auto"


def test_add_noise_and_get_velocity_take_one_timestep_or_one_per_sample_in_the_wider_dtype():
    """Against the closed forms alpha*data + sigma*noise and alpha*noise - sigma*data at t = fm_time(k): one timestep
    serves the whole batch, a 1-D batch takes one per sample, and a float64 argument keeps float64 coefficients."""
    scheduler = D2FScheduler.from_config(SD_CONFIG)
    narrow, wide = torch.randn(2, 500, dtype=torch.float32), torch.randn(2, 500, dtype=torch.float64)
    t = scheduler.schedule.fm_time(torch.tensor([500.0, 500.0], dtype=torch.float64))
    alpha, sigma = (c[:, None] for c in d2f.alpha_sigma(t))
    for sample, noise in ((narrow, wide), (wide, narrow)):
        expected_v = alpha * noise.double() - sigma * sample.double()
        v = scheduler.get_velocity(sample, noise, torch.tensor(500))
        torch.testing.assert_close(v.double(), expected_v.to(sample.dtype).double(), rtol=1e-14, atol=1e-14)
    noisy = scheduler.add_noise(wide, narrow, torch.tensor(500))
    torch.testing.assert_close(noisy, alpha * wide + sigma * narrow.double(), rtol=1e-14, atol=1e-14)
    flat = torch.randn(3, dtype=torch.float64)
    k = torch.tensor([0.0, 500.0, 999.0], dtype=torch.float64)
    alpha, sigma = d2f.alpha_sigma(scheduler.schedule.fm_time(k))
    torch.testing.assert_close(scheduler.add_noise(flat, flat, k), (alpha + sigma) * flat, rtol=1e-14, atol=1e-14)


def test_a_pipeline_that_sets_its_begin_index_starts_there_whatever_timestep_it_passes():
    scheduler = D2FScheduler.from_config(SD_CONFIG)
    scheduler.set_timesteps(5)
    scheduler.set_begin_index()
    assert scheduler.begin_index == 0
    scheduler.set_begin_index(2)
    x = torch.randn(2, 4, 8, 8)
    assert scheduler.scale_model_input(x) is x and scheduler.step_index == 2
    with pytest.raises(ValueError, match="^begin_index=5 must be an integer in \\[0, 5\\)$"):
        scheduler.set_begin_index(5)


@pytest.mark.parametrize("solver", ["euler", "heun", "multistep"])
def test_a_half_precision_step_is_the_float32_step_rounded_once(solver):
    """From the same float16 latent and output, every step computes in float32 and rounds only its result to
    float16: exactly the float32 step's result, rounded."""
    half, single = (D2FScheduler.from_config(SD_CONFIG, solver=solver, clip_sample=False) for _ in range(2))
    half.set_timesteps(3)
    single.set_timesteps(3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g).half()
    for k in half.timesteps:
        o = torch.randn(2, 4, 8, 8, generator=g).half()
        out = half.step(o, k, x).prev_sample
        assert out.dtype == torch.float16
        assert torch.equal(out, single.step(o.float(), k, x.float()).prev_sample.half())
        x = out
