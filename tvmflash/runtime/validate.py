"""Input checks shared by ``Kernel.__call__`` and ``tvmflash.attention``.

Every error names the argument, what was expected and what was given (as FlashInfer's
``check_shape_dtype_device``): TypeError for kinds and dtypes, ValueError for shapes, devices
and values, NotImplementedError for what no kernel of this package supports.
"""

from __future__ import annotations

import math
import numbers

from ..spec import DTYPES, SUPPORTED_HEAD_DIMS, canonical_dtype

INT32_MAX = 2**31 - 1


def array_kind(x, name: str) -> str:
    """'torch', 'numpy' or 'tvm'."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("numpy"):
        return "numpy"
    if mod.startswith("tvm"):
        return "tvm"
    raise TypeError(
        f"{name}: expected a torch.Tensor, numpy.ndarray or tvm Tensor, got {type(x).__module__}.{type(x).__name__}"
    )


def dtype_of(x) -> str:
    return canonical_dtype(x.dtype)


def device_of(x, kind: str, name: str = "q") -> str:
    """'cpu' or 'cuda:N'; ValueError for a device no kernel runs on (torch's meta, mps, ...)."""
    if kind == "torch":
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on device {x.device}")
        return "cpu" if x.device.type == "cpu" else f"{x.device.type}:{x.device.index or 0}"
    if kind == "numpy":
        return "cpu"
    dev = x.device
    name = {1: "cpu", 2: "cuda"}.get(dev.dlpack_device_type(), str(dev))
    return "cpu" if name == "cpu" else f"{name}:{dev.index}"


def last_dim_contiguous(x, kind: str) -> bool:
    if kind == "torch":
        return x.shape[-1] <= 1 or x.stride(-1) == 1
    if kind == "numpy":
        return x.shape[-1] <= 1 or x.strides[-1] == x.itemsize
    return True  # tvm Tensors are compact


#: check_qkv's results by the signature of the tensors it passed (``_signature``): what it checks
#: is the tensors' kinds, shapes, strides, dtypes and devices, so a decode loop calling with the
#: same signature each step checks once.
_QKV_PASSED: dict = {}
_QKV_PASSED_MAX = 1024


def check_qkv(q, k, v, *, head_dim: int | None = None, dtype: str | None = None, group: int | None = None,
              names: tuple[str, str, str] = ("q", "k", "v"), paged: bool = False):
    """Check q, k, v against each other (and against a built kernel's spec where given); errors
    name the arguments by ``names`` (a KV cache's are q, k_cache, v_cache). ``paged``: k and v
    are a paged cache, (num_pages, page_size, heads_kv, head_dim), whose first dimension is not
    the batch (seq_k is then the page size).

    Returns (kind, device, dtype, (batch, seq_q, heads, seq_k, heads_kv, head_dim)).
    """
    sig = _signature(q, k, v)
    if sig is not None:
        key = (sig, head_dim, dtype, group, names, paged)
        passed = _QKV_PASSED.get(key)
        if passed is not None:
            return passed
    result = _check_qkv(q, k, v, head_dim=head_dim, dtype=dtype, group=group, names=names, paged=paged)
    if sig is not None:
        if len(_QKV_PASSED) >= _QKV_PASSED_MAX:
            _QKV_PASSED.clear()
        _QKV_PASSED[key] = result
    return result


def _signature(*arrays):
    """(shape, strides, dtype, device) of each array where all are plain torch tensors (not a
    subclass such as torch.compile's fake tensors), else None: all ``check_qkv`` reads of them."""
    for x in arrays:
        t = type(x)
        if t.__name__ != "Tensor" or t.__module__ != "torch":
            return None
    return tuple((x.shape, x.stride(), x.dtype, x.device) for x in arrays)


def _check_qkv(q, k, v, *, head_dim, dtype, group, names, paged):
    nq, nk, nv = names
    kinds = {name: array_kind(x, name) for name, x in ((nq, q), (nk, k), (nv, v))}
    kind = kinds[nq]
    for name in (nk, nv):
        if kinds[name] != kind:
            raise TypeError(f"{name}: expected the same kind of array as {nq} ({kind}), got {kinds[name]}")
    for name, x in ((nq, q), (nk, k), (nv, v)):
        if len(x.shape) != 4:
            raise ValueError(
                f"{name}: expected rank 4 [batch, seqlen, heads, head_dim], got rank {len(x.shape)} "
                f"with shape {tuple(x.shape)}"
            )
    dt = dtype_of(q)
    if dt not in DTYPES:  # q first: with q float32 and k float16, q is what is wrong
        raise TypeError(f"{nq}: expected dtype float16 or bfloat16, got {dt}")
    if dtype is not None and dt != dtype:
        raise TypeError(f"{nq}: expected dtype {dtype} (the kernel's), got {dt}")
    for name, x in ((nk, k), (nv, v)):
        if dtype_of(x) != dt:
            raise TypeError(f"{name}: expected dtype {dt} (the dtype of {nq}), got {dtype_of(x)}")
    dev = device_of(q, kind, nq)
    for name, x in ((nk, k), (nv, v)):
        if device_of(x, kind, name) != dev:
            raise ValueError(f"{name}: expected device {dev} (the device of {nq}), got {device_of(x, kind, name)}")
    b, sq, h, d = (int(s) for s in q.shape)
    bk, sk, hk, dk = (int(s) for s in k.shape)
    if tuple(int(s) for s in v.shape) != (bk, sk, hk, dk):
        raise ValueError(f"{nv}: expected the shape of {nk} {tuple(k.shape)}, got {tuple(v.shape)}")
    if bk != b and not paged:
        raise ValueError(f"{nk}: expected batch {b} (the batch of {nq}), got {bk}")
    if dk != d:
        raise ValueError(f"{nk}: expected head_dim {d} (the head_dim of {nq}), got {dk}")
    if head_dim is not None and d != head_dim:
        raise NotImplementedError(f"{nq}: expected head_dim {head_dim} (the kernel's), got {d}")
    if head_dim is None and d not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(f"{nq}: expected head_dim in {SUPPORTED_HEAD_DIMS}, got {d}")
    if hk == 0 or h % hk != 0:
        raise ValueError(f"{nk}: expected heads_kv dividing the query heads {h}, got heads_kv {hk}")
    if group is not None and h // hk != group:
        raise ValueError(
            f"{nk}: expected heads_kv = heads / {group} = {h / group:g} (the kernel's GQA group {group}), got {hk}"
        )
    for name, x in ((nq, q), (nk, k), (nv, v)):
        if math.prod(int(s) for s in x.shape) > 0 and not last_dim_contiguous(x, kind):
            raise ValueError(f"{name}: expected a contiguous last dimension (stride 1), got stride {_stride(x, kind)}")
        # (int32 indexing per sequence: the kernel launches on a batch's views; a paged cache's
        # pages are indexed whole)
        per = math.prod(int(s) for s in (x.shape if paged and x is not q else x.shape[1:]))
        if per > INT32_MAX:
            raise NotImplementedError(
                f"{name}: expected at most {INT32_MAX} elements {'in all' if paged and x is not q else 'per sequence'} "
                f"(32-bit indexing), got {per} (shape {tuple(int(s) for s in x.shape)})"
            )
    return kind, dev, dt, (b, sq, h, sk, hk, d)


def _stride(x, kind):
    return x.stride(-1) if kind == "torch" else x.strides[-1] // x.itemsize


def check_out(out, name: str, kind: str, device: str, shape: tuple, dtype: str):
    """Check a caller-given output buffer (``out`` or ``lse``)."""
    if array_kind(out, name) != kind:
        raise TypeError(f"{name}: expected the same kind of array as q ({kind}), got {array_kind(out, name)}")
    if tuple(int(s) for s in out.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    if dtype_of(out) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {dtype_of(out)}")
    if device_of(out, kind, name) != device:
        raise ValueError(f"{name}: expected device {device}, got {device_of(out, kind, name)}")
    contiguous = out.is_contiguous() if kind == "torch" else (kind != "numpy" or out.flags["C_CONTIGUOUS"])
    if not contiguous:
        raise ValueError(f"{name}: expected a contiguous buffer to write into, got strides {_strides(out, kind)}")
    if kind == "numpy" and not out.flags["WRITEABLE"]:
        raise ValueError(f"{name}: expected a writeable array, got a read-only one")


def _strides(x, kind):
    return tuple(x.stride()) if kind == "torch" else tuple(s // x.itemsize for s in x.strides)


def check_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` as a float the kernels take: a normal float32 > 0 whose product with
    log2(e) is finite (they compute in float32, where 1e-50 would be 0 and 3.4e38 * log2(e) inf:
    every output NaN)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    softmax_scale = _real(softmax_scale, "softmax_scale: expected a float or None")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale: expected a finite float > 0, got {softmax_scale}")
    if not SCALE_MIN <= softmax_scale <= SCALE_MAX:
        raise ValueError(f"softmax_scale: expected {SCALE_MIN:.4g} to {SCALE_MAX:.4g} (the kernels compute in float32 "
                         f"and scale by softmax_scale * log2(e)), got {softmax_scale!r}")
    return float(softmax_scale)


def check_softcap(softcap) -> float:
    """``softcap`` as a float: 0 (off) or a finite cap > 0 within float32's normal range (the
    kernels compute ``cap * tanh(s / cap)`` in float32)."""
    softcap = _real(softcap, "softcap: expected a float (0 = off)")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected a finite float >= 0 (0 = off), got {softcap}")
    if softcap and not SCALE_MIN <= softcap <= FLOAT32_MAX:
        raise ValueError(f"softcap: expected 0 or {SCALE_MIN:.4g} to {FLOAT32_MAX:.4g} (a float32 cap), got {softcap!r}")
    return float(softcap)


def check_window(window_size, causal: bool) -> tuple[int, int]:
    """``window_size`` as (left, right) ints, -1 meaning unbounded (FlashAttention-2's
    semantics: query i sees keys i + seq_k - seq_q - left .. i + seq_k - seq_q + right). None is
    (-1, -1). With ``causal`` the right edge is 0: (left, -1) and (left, 0) give (left, 0), and a
    right edge above 0 is an error (causal attention sees no key right of the diagonal)."""
    if window_size is None:
        window_size = (-1, -1)
    if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__") or len(window_size) != 2:
        raise TypeError(f"window_size: expected (left, right), two ints (-1 = unbounded), got {window_size!r}")
    import numpy as np

    edges = []
    for name, x in zip(("left", "right"), window_size):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"window_size: expected (left, right), two ints (-1 = unbounded), got {name} "
                            f"{x!r} ({type(x).__name__})")
        if x < -1:
            raise ValueError(f"window_size: expected {name} >= 0 or -1 (unbounded), got {int(x)}")
        if x > INT32_MAX:
            raise ValueError(f"window_size: expected {name} at most {INT32_MAX} (int32) or -1 (unbounded), got "
                             f"{int(x)}")
        edges.append(int(x))
    left, right = edges
    if causal:
        if right > 0:
            raise ValueError(f"window_size: causal attention sees no key right of the diagonal: expected right 0 or "
                             f"-1 with causal=True, got right {right}")
        right = 0
    return left, right


def window_bounds(window: tuple[int, int], seq_q: int, seq_k: int) -> tuple[int, int]:
    """The kernels' int32 (left, right) of a ``check_window`` window at these lengths: an
    unbounded edge (-1) or one wider than every row's keys becomes the widest that is still
    exact (left = seq_k, right = seq_q), so no key arithmetic in the kernel overflows."""
    left, right = window
    left = seq_k if left < 0 or left > seq_k else left
    right = seq_q if right < 0 or right > seq_q else right
    return left, right


def window_kind(window: tuple[int, int], seq_q: int, seq_k: int) -> tuple[bool, bool]:
    """(causal, window) of the kernel that runs a ``check_window`` window at these lengths: no
    window where both edges see every key (left >= seq_k - 1, right >= seq_q - 1, or -1), and
    a causal kernel where the right edge is the diagonal (right 0), as FlashAttention-2 does."""
    left, right = window
    open_left = left < 0 or left >= seq_k - 1
    open_right = right < 0 or right >= seq_q - 1
    causal = right == 0
    return causal, not open_left or (not causal and not open_right)


def check_alibi(alibi_slopes, kind: str, device: str, batch: int, heads: int):
    """ALiBi's slopes as the kernels take them, [batch, heads] float32 and compact: from
    (heads,) or (batch, heads), float32 (as FlashAttention-2), the kind and device of q."""
    if array_kind(alibi_slopes, "alibi_slopes") != kind:
        raise TypeError(f"alibi_slopes: expected the same kind of array as q ({kind}), got "
                        f"{array_kind(alibi_slopes, 'alibi_slopes')}")
    if dtype_of(alibi_slopes) != "float32":
        raise TypeError(f"alibi_slopes: expected dtype float32, got {dtype_of(alibi_slopes)}")
    shape = tuple(int(n) for n in alibi_slopes.shape)
    if shape not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes: expected shape ({heads},) or ({batch}, {heads}) (heads, or batch and "
                         f"heads, of q), got {shape}")
    if device_of(alibi_slopes, kind, "alibi_slopes") != device:
        raise ValueError(f"alibi_slopes: expected device {device} (the device of q), got "
                         f"{device_of(alibi_slopes, kind, 'alibi_slopes')}")
    if kind == "torch":
        return alibi_slopes.expand(batch, heads).contiguous()
    if kind == "numpy":
        import numpy as np

        return np.ascontiguousarray(np.broadcast_to(alibi_slopes, (batch, heads)))
    if shape != (batch, heads):
        raise ValueError(f"alibi_slopes: a tvm Tensor must have shape ({batch}, {heads}), got {shape}")
    return alibi_slopes


def check_lengths(lengths, name: str, kind: str, device: str, batch: int):
    """Per-sequence lengths as the kernels take them, (batch,) int32 and compact, of the kind and
    device of q (their values are not read here: that would wait for the GPU)."""
    return _int32_array(lengths, name, kind, device, lambda shape: shape == (batch,),
                        f"({batch},) (the batch of q)")


def check_block_table(block_table, kind: str, device: str, batch: int):
    """A paged cache's block table as the kernels take it, (batch, max_pages) int32 and compact,
    of the kind and device of q (its entries are not read here)."""
    return _int32_array(block_table, "block_table", kind, device,
                        lambda shape: len(shape) == 2 and shape[0] == batch and shape[1] >= 1,
                        f"({batch}, max_pages) (the batch of q, at least one page)")


def host_side(x, name: str, kind: str, device: str) -> str:
    """The device an index array may be on: q's, or the CPU where q is a torch tensor on a GPU
    (its values are then read without waiting for the GPU)."""
    if kind == "torch" and device != "cpu" and array_kind(x, name) == "torch" and x.device.type == "cpu":
        return "cpu"
    return device


def to_device(array, kind: str, device: str):
    """A numpy array as the kernels take it: itself (numpy), or a torch tensor on ``device``,
    copied asynchronously (cudaMemcpyAsync stages pageable memory before it returns)."""
    if kind == "numpy":
        return array
    import torch

    t = torch.from_numpy(array)
    return t if device == "cpu" else t.to(device, non_blocking=True)


def host_array(x, kind: str):
    """A checked index array's values on the host, as numpy (from a GPU: a synchronisation)."""
    return x.cpu().numpy() if kind == "torch" else x


def checked_copy(x, host, side: str, kind: str, device: str):
    """The index array the kernel reads: ``x`` where it is on q's device, else (on the CPU, q on
    a GPU) the checked host copy sent there, not the caller's array, which the caller may change
    before an asynchronous copy of it runs."""
    import numpy as np

    return x if side == device else to_device(np.array(host, dtype=np.int32), kind, device)


def _int32_array(x, name: str, kind: str, device: str, shape_ok, expected: str):
    """``x`` compact, after checking it is an int32 array of q's kind and device whose shape
    ``shape_ok`` accepts (``expected`` says which, in the error)."""
    if array_kind(x, name) != kind:
        raise TypeError(f"{name}: expected the same kind of array as q ({kind}), got {array_kind(x, name)}")
    if dtype_of(x) != "int32":
        raise TypeError(f"{name}: expected dtype int32, got {dtype_of(x)}")
    shape = tuple(int(n) for n in x.shape)
    if not shape_ok(shape):
        raise ValueError(f"{name}: expected shape {expected}, got {shape}")
    if device_of(x, kind, name) != device:
        raise ValueError(f"{name}: expected device {device} (the device of q), got {device_of(x, kind, name)}")
    if kind == "torch":
        return x.contiguous()
    if kind == "numpy":
        import numpy as np

        return np.ascontiguousarray(x)
    return x


def _real(value, expected: str):
    """``value`` (a Python or numpy int or float, not a bool) as it is, or a numpy scalar as a
    float; TypeError "<expected>, got <type>" otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        import numpy as np

        if isinstance(value, np.generic) and not isinstance(value, np.bool_):
            return float(value)
        raise TypeError(f"{expected}, got {type(value).__name__}")
    return value


SCALE_MIN = 1.1754943508222875e-38  # the smallest normal float32
FLOAT32_MAX = 3.4028234663852886e38
SCALE_MAX = FLOAT32_MAX / 1.4426950408889634  # softmax_scale * log2(e) stays a finite float32


#: The most key chunks a split kernel takes (``num_splits``): beyond, a chunk would hold too few
#: keys to pay for its partial's store and the combine's reads.
MAX_SPLITS = 128


def check_num_splits(num_splits) -> int:
    """``num_splits`` as an int: 0 (choose), 1 (no split) up to ``MAX_SPLITS``."""
    import numpy as np

    if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)):
        raise TypeError(f"num_splits: expected an int (0 = choose, 1 = no split), got "
                        f"{type(num_splits).__name__} ({num_splits!r})")
    if not 0 <= int(num_splits) <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected 0 (choose) to {MAX_SPLITS}, got {int(num_splits)}")
    return int(num_splits)


def check_split_partials(splits: int, b: int, sq: int, h: int, d: int) -> None:
    """ValueError where a split kernel's partial results (``splits`` of them per output value)
    would pass its int32 indexing."""
    n = splits * b * sq * h * d
    if splits and n > INT32_MAX:
        raise ValueError(
            f"num_splits: the split kernel keeps splits * batch * seq_q * heads * head_dim = {n:,} partial values, "
            f"more than its int32 indexing allows ({INT32_MAX:,}): expected fewer splits than {splits} (or "
            f"num_splits=1) for q [{b}, {sq}, {h}, {d}]")


def check_bool(value, name: str) -> bool:
    """``value`` as a bool: a Python or numpy bool; TypeError otherwise."""
    if isinstance(value, bool):
        return value
    import numpy as np

    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__} ({value!r})")


def _extent(x, kind: str):
    """(first byte, one past the last byte) that array ``x`` may touch, or None (tvm Tensors)."""
    if kind == "torch":
        if x.numel() == 0:
            return None
        start = x.data_ptr()
        span = sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride())) + 1
        return start, start + span * x.element_size()
    return None


def check_no_overlap(outputs: dict, inputs: dict, kind: str) -> None:
    """ValueError if an output buffer (``out``, ``lse``) shares memory with an input or with the
    other output: the kernel would read what it already overwrote."""
    named = list(outputs.items())
    for i, (oname, o) in enumerate(named):
        others = list(inputs.items()) + named[i + 1:]
        for iname, x in others:
            if x is None or o is None:
                continue
            if kind == "numpy":
                import numpy as np

                overlap = np.shares_memory(o, x, max_work=10**6)
            else:
                a, b = _extent(o, kind), _extent(x, kind)
                overlap = a is not None and b is not None and a[0] < b[1] and b[0] < a[1] and (
                    kind != "torch" or o.device == x.device)
            if overlap:
                raise ValueError(f"{oname}: expected a buffer of its own, got one that shares memory with {iname}")


def check_no_grad(kind: str, *arrays) -> None:
    """NotImplementedError where autograd would record a call: tvmflash has no backward yet, and
    a detached result would lose the gradient silently."""
    if kind != "torch":
        return
    import torch

    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in arrays):
        names = [n for n, x in zip(("q", "k", "v"), arrays) if x is not None and x.requires_grad]
        raise NotImplementedError(
            f"{', '.join(names)}: tvmflash has no backward pass yet, and {'these require' if len(names) > 1 else 'this requires'}"
            " grad; call it under torch.no_grad() (or on detached tensors) for inference")


def check_packed(q, k, v, **against):
    """``validate.check_qkv`` for packed q [total_q, heads, d], k, v [total_k, heads_kv, d] (and
    ``against`` a kernel's head_dim, dtype, group): (kind, device, dtype, (1, total_q, heads,
    total_k, heads_kv, d))."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if array_kind(x, name) not in ("torch", "numpy"):
            raise TypeError(f"{name}: expected a torch tensor or a numpy array, got {array_kind(x, name)}")
        if len(x.shape) != 3:
            raise ValueError(f"{name}: expected rank 3 [total_tokens, heads, head_dim] (packed sequences), got rank "
                             f"{len(x.shape)} with shape {tuple(x.shape)}")
    return check_qkv(*(x[None] for x in (q, k, v)), **against)


def check_max_seqlen(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not 0 <= value <= INT32_MAX:
        raise ValueError(f"{name}: expected an int in [0, {INT32_MAX}], got {int(value)}")
    return int(value)


def check_prefix_sums(cu, name: str, kind: str, device: str, total: int, longest_max: int, max_name: str,
                      batch_p1: int | None = None):
    """(the prefix sums as the kernel takes them, on the device of q; the longest sequence's
    length), after checking them: (batch + 1,) int32 (``batch_p1`` of them where given), 0 first,
    non-decreasing, ``total`` (the packed rows) last, no sequence longer than ``longest_max``
    (``max_name``). On q's device (read back: on a GPU, a synchronisation) or, torch with q on a
    GPU, on the CPU (read there; the checked copy goes to the GPU asynchronously)."""
    import numpy as np

    side = host_side(cu, name, kind, device)
    expected = "(batch + 1,)" if batch_p1 is None else f"({batch_p1},) (that of cu_seqlens_q)"
    arr = _int32_array(cu, name, kind, side, lambda s: len(s) == 1 and s[0] >= 1, expected)
    if batch_p1 is not None and int(arr.shape[0]) != batch_p1:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(int(n) for n in arr.shape)}")
    host = host_array(arr, kind)
    if int(host[0]) != 0:
        raise ValueError(f"{name}: expected prefix sums starting at 0, got {name}[0] = {int(host[0])}")
    steps = np.diff(host.astype(np.int64))
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise ValueError(f"{name}: expected non-decreasing prefix sums, got {name}[{i}] = {int(host[i])} > "
                         f"{name}[{i + 1}] = {int(host[i + 1])}")
    if int(host[-1]) != total:
        raise ValueError(f"{name}: expected the last prefix sum to be {total} (the packed length), got {name}[-1] = "
                         f"{int(host[-1])}")
    longest = int(steps.max(initial=0))
    if longest > longest_max:
        raise ValueError(f"{max_name}: expected at least the longest sequence's {longest} (by {name}), got "
                         f"{longest_max}")
    return checked_copy(arr, host, side, kind, device), longest
