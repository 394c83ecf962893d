"""Serve a saved Atlas-MAG folder with vLLM's OpenAI-compatible server: `vllm serve`, also on vLLM's CPU build.

    python scripts/serve_vllm.py outputs/main_job/atlas-mag-recall --host 127.0.0.1 --port 8000

Takes every option of `vllm serve` (see atlas_mag/vllm_serving.py for why this is not the `vllm` command).
"""

import sys

from atlas_mag.vllm_serving import main

if __name__ == "__main__":
    main(sys.argv[1:])
