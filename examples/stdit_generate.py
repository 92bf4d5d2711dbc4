"""Generate a video with Open-Sora 1.2: ``xdit generate opensora`` as a script (the job lives in
serving.generate_opensora).

    python examples/stdit_generate.py                      # tiny random models, one CPU process
    torchrun --nproc_per_node 4 examples/stdit_generate.py --model-path /models/OpenSora-STDiT-v3 \\
        --vae-path /models/OpenSora-VAE-v1.2 --text-encoder-path /models/t5-v1_1-xxl --resolution 720p
"""

from __future__ import annotations

from serving.generate_opensora import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    main()
