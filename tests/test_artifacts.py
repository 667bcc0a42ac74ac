"""Artifacts: export then load in a fresh process; two processes building one key at once."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from tvmflash import KernelSpec, build


def _python(code, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_export_then_load_in_fresh_process(tmp_path, rng):
    from helpers import make_qkv
    from tvmflash import load

    so, manifest_path = build(KernelSpec(64, causal=True, group=2), tmp_path)
    manifest = json.loads(open(manifest_path).read())
    assert manifest["key"] == os.path.basename(so)[:-3] and manifest["functions"] == ["main"]
    q, k, v = make_qkv(rng, 1, 70, 90, 4, 2, 64, "float16")
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v)
    here = load(so)(q, k, v)
    res = _python(f"""
        import numpy as np, tvmflash
        d = np.load({str(tmp_path / 'in.npz')!r})
        out = tvmflash.load({so!r})(d["q"], d["k"], d["v"])
        np.save({str(tmp_path / 'out.npy')!r}, out)
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert np.load(tmp_path / "out.npy").tobytes() == here.tobytes()


def test_two_processes_build_one_key_into_the_cache(tmp_path):
    code = """
        import numpy as np, tvmflash
        q = np.random.default_rng(0).standard_normal((1, 20, 2, 96)).astype(np.float16)
        out = tvmflash.attention(q, q, q, causal=True)
        assert not np.isnan(out.astype(np.float32)).any()
        print("done")
    """
    env = {"TVMFLASH_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env}) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "done" in out, err[-3000:]
    files = sorted(os.listdir(tmp_path / "cache"))
    keys = {f.rsplit(".", 1)[0] for f in files if not f.startswith(".")}
    assert len(keys) == 1, files
    assert not [f for f in files if f.startswith(".")], f"temporary files left behind: {files}"
    key = keys.pop()
    json.loads((tmp_path / "cache" / f"{key}.json").read_text())  # a whole manifest
