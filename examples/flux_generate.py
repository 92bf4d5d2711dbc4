"""Generate one image with FLUX: ``xdit generate flux`` as a script (the job lives in serving.generate_flux).

python examples/flux_generate.py                       # the tiny random pipeline, one CPU process
torchrun --nproc_per_node 4 examples/flux_generate.py --model-path /models/FLUX.1-dev --ulysses-degree 4
"""

from __future__ import annotations

from serving.generate_flux import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    main()
