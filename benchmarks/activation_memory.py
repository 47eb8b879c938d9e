"""Where the memory plan's activation constants come from: what autograd keeps for one training
step of each family's published denoiser (random bf16 weights, a rank-16 LoRA, bf16 autocast),
measured on the CPU at two sizes, beside the family's estimate.

FLUX is measured one and two blocks deep (the difference is one block); the UNets whole.

    .venv/bin/python -m benchmarks.activation_memory          # a few minutes, about 8 GB of memory
"""

from __future__ import annotations

from devtools.memory import measure, published_denoiser
from fastbackend.training.families import family_for

MB = 1e6
# (arch, image sizes); FLUX's text: 128 tokens, its estimate's schnell-length 256 adjusted below.
CASES = {"flux": (256, 512), "sd15": (384, 512), "sdxl": (512, 768)}
FLUX_DEPTHS = ((1, 1), (2, 1), (1, 2))


def flux_rows(size: int, checkpointing: bool) -> list[tuple[str, float, float]]:
    """FLUX per block kind: measured bytes of one more block vs the estimate's, and the whole."""
    kept = {}
    for doubles, singles in FLUX_DEPTHS:
        config, model = published_denoiser("flux", num_layers=doubles, num_single_layers=singles)
        kept[doubles, singles] = measure("flux", model, size, 256, checkpointing).total
        del model
    config = config | {"num_layers": 1, "num_single_layers": 1, "guidance_embeds": False}  # 256 text tokens
    estimate = family_for("flux").activation_bytes(config, size, size, checkpointing).kept
    return [
        ("one double block", kept[2, 1] - kept[1, 1], None),
        ("one single block", kept[1, 2] - kept[1, 1], None),
        ("one block of each", kept[1, 1], estimate),
    ]


def main() -> None:
    print(f"{'model':<6}{'px':>6}  {'checkpointing':<15}{'part':<20}{'kept MB':>10}{'estimate MB':>13}{'ratio':>7}")
    for arch, sizes in CASES.items():
        for size in sizes:
            for checkpointing in (False, True):
                if arch == "flux":
                    rows = flux_rows(size, checkpointing)
                else:
                    config, model = published_denoiser(arch)
                    kept = measure(arch, model, size, 77, checkpointing).total
                    estimate = family_for(arch).activation_bytes(config, size, size, checkpointing).kept
                    rows = [("whole UNet", kept, estimate)]
                for part, kept, estimate in rows:
                    shown = f"{estimate / MB:>13.0f}{estimate / kept:>7.2f}" if estimate else ""
                    flag = "on" if checkpointing else "off"
                    print(f"{arch:<6}{size:>6}  {flag:<15}{part:<20}{kept / MB:>10.0f}{shown}", flush=True)


if __name__ == "__main__":
    main()
