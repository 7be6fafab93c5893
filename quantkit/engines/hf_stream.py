"""The base's reference scores in bounded memory: the HF model in fp32, run one block at a time.

Every verify and eval compares a variant with the base's distribution in transformers, fp32
(:func:`quantkit.evaluate.base_cache`). Loading that model whole takes 4 bytes a parameter (about 282 GB for a
70B), so here it is built without weights (meta tensors; buffers such as rotary frequencies real) and the
windows go through it a block at a time: a decoder layer's weights are read from the safetensors (plain reads,
no mapping), cast to fp32, run on every window, and dropped. The model's own code does everything else: what
happens before the first layer (embedding, its scaling, rotary tables, masks) is captured as the arguments the
model passes each layer, and what happens after the last (final norm, ``lm_head``, soft-capping) runs in the
model's forward with the layers passed through. So the numbers are the whole model's.

Peak memory (:func:`reference_bytes`): the largest block in fp32 + two copies of every window's hidden states +
one group of windows' activations (``GROUP_BYTES``) + the runtime. A model whose parameters do not map one to
one onto its checkpoint's tensors (transformers 5 fuses MoE experts into 3-D tensors at load time) cannot be
streamed this way: :func:`stream_check` says so and it is loaded whole.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from quantkit import trust
from quantkit.engines import Session
from quantkit.errors import QuantkitError
from quantkit.util import dist_version

#: activations of one group of windows through one layer stay under about this many bytes
GROUP_BYTES = 1 << 30
#: torch, transformers and Python themselves
RUNTIME_BYTES = 1 << 30
_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")


class _Stop(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _libc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS): its allocator returns freed memory itself
        return None


def _trim() -> None:
    """Give the freed block back to the OS: glibc keeps freed tensors of a few MB in its heap (its mmap
    threshold grows after each large free), which measured +30 MB of RSS a layer, 1.4 GB peak instead of 0.8 GB
    on a 30-layer model."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


#: safetensors dtype -> torch dtype name
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def checkpoint_index(path: Path) -> dict[str, tuple[Path, dict]]:
    """Tensor name -> (safetensors file, its header entry) of an HF folder (one file, or its shards)."""
    import struct

    from quantkit.util import read_safetensors_header

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QuantkitError(f"{path} has no safetensors weights")
    out = {}
    for f in files:
        with open(f, "rb") as h:
            start = 8 + struct.unpack("<Q", h.read(8))[0]
        for name, entry in read_safetensors_header(f).items():
            if name != "__metadata__":
                out[name] = (f, {**entry, "start": start})
    return out


def read_tensor(where: tuple[Path, dict]):
    """One tensor read from its file with a plain read (no mapping of the whole file, so memory stays the
    tensor's own; the page cache it passes through is the kernel's to reclaim)."""
    import torch

    f, e = where
    a, b = e["data_offsets"]
    buf = bytearray(b - a)
    with open(f, "rb") as h:
        h.seek(e["start"] + a)
        h.readinto(buf)
    dtype = getattr(torch, _DTYPES[e["dtype"]])
    t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
    return t.reshape(e.get("shape") or [])


def block_of(name: str) -> str:
    """The block a tensor belongs to: ``model.layers.3`` for a decoder layer's, else the tensor's module."""
    m = _LAYER.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


def reference_bytes(block_params: int, hidden: int, tokens: int) -> int:
    """Peak bytes of the reference over ``tokens`` tokens when its largest block (or, loaded whole, the model)
    has ``block_params`` parameters: that block in fp32, two copies of the hidden states, one group's
    activations and the runtime."""
    return block_params * 4 + 2 * tokens * hidden * 4 + GROUP_BYTES + RUNTIME_BYTES


def _skeleton(config):
    """The model of ``config`` (an HF folder, or a config.json dict) with meta parameters and real buffers."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    else:
        config = AutoConfig.from_pretrained(config, **trust.hf_kwargs())
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **trust.hf_kwargs())
    return model.eval()


def _param_keys(model, ckpt) -> tuple[dict[str, str], list[str]]:
    """Model parameter name -> checkpoint tensor name (``ckpt``: the checkpoint's names), and the parameters
    with none."""
    tied = getattr(model, "_tied_weights_keys", None)
    tied = tied if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False) else {}
    prefix = getattr(model, "base_model_prefix", "") + "."
    keys, missing = {}, []
    for name, _ in model.named_parameters(remove_duplicate=False):
        for cand in (name, tied.get(name), name.removeprefix(prefix) if name.startswith(prefix) else None):
            if cand and cand in ckpt:
                keys[name] = cand
                break
        else:
            missing.append(name)
    return keys, missing


def _check(model, names) -> tuple[bool, str | None]:
    _, missing = _param_keys(model, set(names))
    if missing:
        return False, f"transformers converts {len(missing)} parameters on load (e.g. {missing[0]})"
    if not len(getattr(model.get_decoder(), "layers", None) or ()):
        return False, "the decoder has no list of layers"
    return True, None


def stream_check(path: Path) -> tuple[bool, str | None]:
    """Whether the base at ``path`` can be scored a block at a time (every parameter is one checkpoint tensor,
    the decoder's layers are a list); the reason when not."""
    try:
        return _check(_skeleton(Path(path)), checkpoint_index(Path(path)))
    except Exception as e:  # noqa: BLE001 - any failure means: load it whole
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@functools.lru_cache(maxsize=64)
def _config_check(config_json: str, names: tuple[str, ...] | None) -> tuple[bool, str | None]:
    try:
        model = _skeleton(json.loads(config_json))
        return _check(model, names if names is not None else
                      [n for n, _ in model.named_parameters(remove_duplicate=False)])
    except Exception as e:  # noqa: BLE001
        return False, f"transformers cannot build it ({type(e).__name__})"


def stream_check_config(config: dict, names: list[str] | None) -> tuple[bool, str | None]:
    """:func:`stream_check` from a config.json and the checkpoint's tensor names (``None``: not known, taken to
    be the parameters' own), before anything is downloaded."""
    return _config_check(json.dumps(config, sort_keys=True), tuple(sorted(names)) if names is not None else None)


class NotStreamable(QuantkitError):
    """The base cannot be scored a layer at a time (the reason is the message): load it whole."""


class StreamedSession(Session):
    """The fp32 base, scored over many windows at once with one block's weights in memory at a time."""

    def __init__(self, path: Path, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path)
        try:
            self.model = _skeleton(self.path)
            ckpt = checkpoint_index(self.path)
        except Exception as e:  # noqa: BLE001 - as stream_check: any failure means load it whole
            raise NotStreamable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        ok, why = _check(self.model, ckpt)
        if not ok:
            raise NotStreamable(why)
        self.keys, _ = _param_keys(self.model, ckpt)
        self._ckpt = ckpt
        self.decoder = self.model.get_decoder()
        self.layers = list(self.decoder.layers)[: getattr(self.model.config, "num_hidden_layers", None)]
        self.names = {m: n for n, m in self.model.named_modules()}
        self.label = f"transformers {dist_version('transformers')} (cpu, float32, a layer at a time)"
        self.peak_block_bytes = 0

    # -- weights ----------------------------------------------------------------------------------
    def _load(self, module) -> None:
        import torch
        from accelerate.utils import set_module_tensor_to_device

        prefix = self.names[module]
        total = 0
        for name, _ in module.named_parameters(prefix=prefix, remove_duplicate=False):
            key = self.keys[name]
            t = read_tensor(self._ckpt[key]).to(torch.float32)
            set_module_tensor_to_device(self.model, name, "cpu", value=t)
            total += t.numel() * 4
        self.peak_block_bytes = max(self.peak_block_bytes, total)

    def _drop(self, module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        if self.model is None:  # closed before its generator was: nothing is held any more
            return
        for name, _ in module.named_parameters(prefix=self.names[module], remove_duplicate=False):
            set_module_tensor_to_device(self.model, name, "meta")
        _trim()

    def _patched(self, forwards: dict):
        """Context: each module in ``forwards`` runs the given function instead of its own forward."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            for m, f in forwards.items():
                m.forward = f
            try:
                yield
            finally:
                for m in forwards:
                    del m.forward
        return cm()

    # -- scoring --------------------------------------------------------------------------------------
    def _group(self, n_windows: int, length: int) -> int:
        cfg = self.model.config
        h = int(getattr(cfg, "hidden_size", 0) or 0)
        inter = int(getattr(cfg, "intermediate_size", 0) or 4 * h)
        heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
        per_token = 4 * (6 * h + 3 * inter + heads * length)
        return max(1, min(n_windows, GROUP_BYTES // max(1, per_token * length)))

    def _capture(self, ids):
        """The hidden states the model gives its first layer, and the other arguments it gives each layer."""
        import torch

        calls: list[tuple[tuple, dict]] = []
        first: list = []
        last = len(self.layers) - 1

        def recorder(i):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if i == 0:
                    first.append(hidden)
                calls.append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
                if i == last:
                    raise _Stop
                return hidden
            return forward

        with self._patched({layer: recorder(i) for i, layer in enumerate(self.layers)}):
            try:
                with torch.inference_mode():
                    self.decoder(input_ids=ids, use_cache=False)
            except _Stop:
                pass
        return first[0], calls

    def score_windows(self, windows: list[list[int]], progress=None, k: int | None = None):
        """Logits ``[len, vocab]`` of each window, in order (all windows go through each layer before the next)."""
        import torch

        length = len(windows[0])
        if any(len(w) != length for w in windows):
            raise QuantkitError("streamed scoring needs windows of one length")
        g = self._group(len(windows), length)
        groups = [torch.tensor(windows[i:i + g]) for i in range(0, len(windows), g)]
        embed = self.model.get_input_embeddings()
        self._load(embed)
        hidden, args = [], {}
        for ids in groups:
            h, calls = self._capture(ids)
            hidden.append(h.clone())
            args.setdefault(ids.shape[0], calls)  # the same for every group of one size
        self._drop(embed)
        tuple_out = False
        steps = progress(self.layers, desc="base (transformers, by layer)", unit="layer") if progress \
            else self.layers
        with torch.inference_mode():
            for i, layer in enumerate(steps):
                self._load(layer)
                for j, ids in enumerate(groups):
                    rest, kw = args[ids.shape[0]][i]
                    out = layer(hidden[j], *rest, **kw)
                    tuple_out = isinstance(out, tuple)
                    hidden[j] = out[0] if tuple_out else out
                self._drop(layer)
        # after the last layer: the model's own forward, its layers passed through and its embedding skipped
        tail = [m for m in (getattr(self.decoder, "norm", None), self.model.get_output_embeddings()) if m is not None]
        for m in tail:
            self._load(m)
        shape = hidden[0].shape[-1]
        try:
            for j, ids in enumerate(groups):
                for b in range(ids.shape[0]):
                    final = hidden[j][b:b + 1]

                    def passthrough(*a, _final=final, **k):
                        return (_final,) if tuple_out else _final

                    def no_embed(x, _n=shape):
                        return torch.zeros(*x.shape, _n)

                    with self._patched({**{layer: passthrough for layer in self.layers}, embed: no_embed}):
                        with torch.inference_mode():
                            out = self.model(input_ids=ids[b:b + 1], use_cache=False)
                    yield out.logits[0].float()
                hidden[j] = None
        finally:
            for m in tail:
                self._drop(m)

    def score(self, window: list[int], k: int | None = None):
        return next(iter(self.score_windows([window])))

    def close(self):
        self.model = None
