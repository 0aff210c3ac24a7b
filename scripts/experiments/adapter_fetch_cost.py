"""What the Ray shards paid per step before they cached style adapters: unpickling a
default-model adapter (rank 4) and selecting its expert's layers, as every step did.

    python scripts/experiments/adapter_fetch_cost.py
"""

from __future__ import annotations

import pickle
import time

from services.denoiser import lora
from services.denoiser.model import MODELS, MoEDenoiser

cfg = MODELS["default"]
m = MoEDenoiser(cfg)
lc = lora.LoRAConfig(rank=4, alpha=4.0)
lora.attach(m, lc, seed=1)
a = lora.detach(m, lc, name="x", base_model=cfg.name, description="")
blob = pickle.dumps(a)
print("adapter pickle MB", len(blob) / 1e6)
prefix = MoEDenoiser._shard_modules["low_noise"] + "."
n = 50
t = time.perf_counter()
for _ in range(n):
    pickle.loads(blob).under(prefix)
print("per step before (deserialise + under): %.2f ms" % ((time.perf_counter() - t) / n * 1e3))
