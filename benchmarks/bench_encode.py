"""``d2f encode`` end to end on the tests' tiny SD and SDXL pipelines, and on the shipped miniature Stable
Diffusion with the captioned digits: a folder of 64 captioned PNGs to a latents file, pipeline loading, image
decoding, fingerprints and the atomic write included. Time (pytest-benchmark; images per second in
``extra_info``) and the process's peak resident memory.

The pipelines are tiny (a one-block VAE, two-layer CLIP text encoders). At 32 px this measures mostly d2f's
own work around the models (reading, cropping, tokenising, batching, writing). The tiny VAE does not
downsample, so at 128 px its mid-block attention runs over all 16384 positions of each image and the VAE
dominates. An SD-size VAE at 768 px is a GPU's job and is not measured here.
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from d2f.data.digit_captions import write_digit_folder  # noqa: E402
from d2f.data.encode import encode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny pipeline builders
from pipelines import captioned_folder, tiny_sd_pipeline  # noqa: E402

IMAGES = 64


def peak_gib() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 2**20


@pytest.mark.parametrize("resolution", [32, 128])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_encode_a_captioned_folder(benchmark, tmp_path, kind, resolution):
    pipeline = tiny_sd_pipeline(tmp_path / "pipeline", xl=kind == "sdxl")
    images = captioned_folder(tmp_path / "images", n=IMAGES, formats="jsonl")
    benchmark.group = f"d2f encode, {IMAGES} captioned images, tiny pipeline, cpu"
    measure(benchmark, pipeline, images, resolution, tmp_path / "latents.safetensors")


@pytest.mark.parametrize("resolution", [64, 128])
def test_encode_the_captioned_digits_with_the_shipped_miniature(benchmark, tmp_path, resolution):
    """What the main job encodes (there: all 5000 digits at 128 px), on the pipeline it ships."""
    images = write_digit_folder(tmp_path / "digits", resolution, count=IMAGES)
    benchmark.group = f"d2f encode, {IMAGES} captioned digits, shipped miniature SD, cpu"
    measure(benchmark, "miniature", images, resolution, tmp_path / "latents.safetensors")


def measure(benchmark, pipeline, images, resolution: int, out: Path) -> None:
    """Five timed encodes of ``images`` (one warm-up), then images/s, peak memory and the file's size."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the resident high-water mark

    def once():
        out.unlink(missing_ok=True)
        encode(pipeline, images, resolution, out, progress=False, device="cpu")

    benchmark.pedantic(once, rounds=5, warmup_rounds=1)
    if benchmark.disabled:  # --benchmark-disable (CI): one call, checked for errors, nothing timed
        return
    benchmark.extra_info["images_per_second"] = round(IMAGES / benchmark.stats.stats.median, 1)
    benchmark.extra_info["peak_memory_gib"] = round(peak_gib(), 3)
    benchmark.extra_info["latents_file_mib"] = round(out.stat().st_size / 2**20, 2)
