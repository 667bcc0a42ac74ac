"""The GPU side of ``test_hopper.py``, run in a child process (a hang is killed, not waited on):
``python hopper_gpu.py numerics|determinism '<case json>'`` prints ``RESULT <json>``."""

import json
import sys

import numpy as np


def _inputs(case):
    import torch

    b, sq, sk, h, hk, d, dtype, causal = case
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = getattr(torch, dtype)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dt, generator=g)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dt, generator=g)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dt, generator=g)
    return q, k, v, causal


def _rule(case) -> str:
    from tvmflash.builder import plan
    from tvmflash.runtime.api import target_for
    from tvmflash.spec import KernelSpec

    b, sq, sk, h, hk, d, dtype, causal = case
    return plan(KernelSpec(d, dtype=dtype, causal=causal, group=h // hk, target=target_for("cuda:0"))).rule.name


def numerics(case):
    import torch

    import tvmflash
    from test_gpu import _torch_reference
    from tvmflash.definition.reference import attention_reference

    q, k, v, causal = _inputs(case)
    out, lse = tvmflash.attention(q, k, v, causal=causal, return_lse=True)
    torch.cuda.synchronize()
    qn, kn, vn = (x.float().cpu().numpy() for x in (q, k, v))
    ref, ref_lse = attention_reference(qn, kn, vn, causal=causal)
    # a plain PyTorch computation in the input dtype (FlashAttention's yardstick)
    plain = _torch_reference(q, k, v, causal, dtype=q.dtype).float().cpu().numpy()
    o = out.float().cpu().numpy()
    err = float(np.abs(o - ref).max()) if o.size else 0.0
    err_plain = float(np.abs(plain - ref).max()) if o.size else 0.0
    ln = lse.cpu().numpy()
    fin = np.isfinite(ref_lse)
    lerr = float(np.abs(ln[fin] - ref_lse[fin]).max()) if fin.any() else 0.0
    same_inf = bool((np.isneginf(ln) == np.isneginf(ref_lse)).all())
    ok = not np.isnan(o).any() and err <= max(2 * err_plain, 1e-3) and lerr <= 1e-3 and same_inf
    return {"rule": _rule(case), "err": err, "err_plain": err_plain, "lse_err": lerr, "same_inf": same_inf,
            "ok": bool(ok)}


def determinism(case):
    import torch

    import tvmflash

    q, k, v, causal = _inputs(case)
    first = tvmflash.attention(q, k, v, causal=causal)
    identical = all(torch.equal(first, tvmflash.attention(q, k, v, causal=causal)) for _ in range(100))
    return {"rule": _rule(case), "identical": bool(identical)}


if __name__ == "__main__":
    what, case = sys.argv[1], json.loads(sys.argv[2])
    print("RESULT " + json.dumps({"numerics": numerics, "determinism": determinism}[what](case)), flush=True)
