"""UMT5-XXL text encoder for Wan2.2, on transformers' `UMT5EncoderModel`.

Two checkpoint layouts load into the same transformers module:

* official Wan-AI root: ``models_t5_umt5-xxl-enc-bf16.pth`` (a pickle of the Wan `T5Encoder` state dict,
  names like ``blocks.3.attn.q.weight``) + tokenizer folder ``google/umt5-xxl/``;
* diffusers root: ``text_encoder/`` (transformers config + safetensors) + ``tokenizer/``.

The official names are renamed through `official_to_hf_key` (inverse: `hf_to_official_key`).  The
model is built on the meta device and the tensors are assigned, so the 11 GB checkpoint is never
materialised twice.

Output contract (what the DiT expects): [B, text_len, d_model], each prompt's real tokens (including
the closing </s>) followed by exact zero rows.  The reference trims the encoder output to the real
length and the DiT zero-pads it back to 512; padding here is equivalent and keeps batches rectangular.
"""
from __future__ import annotations

import html
import json
import pickle
import re
import unicodedata
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

try:  # the official cleaner runs ftfy.fix_text first; use it when installed
    import ftfy
except ImportError:  # pragma: no cover - exercised only without ftfy
    ftfy = None

try:  # the reference uses the `regex` module, whose \s is Unicode White_Space
    import regex as _re
except ImportError:  # pragma: no cover
    _re = re

OFFICIAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER_DIR = "google/umt5-xxl"
TEXT_LEN = 512

# UMT5-XXL as used by Wan (wan/modules/t5.py umt5_xxl): used when a checkpoint's shapes cannot tell us.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32)

# ---------------------------------------------------------------------------------------------
# Key map.  Official Wan T5Encoder (pre-norm blocks, per-layer relative position bias, gated GELU
# ffn where fc1(x) * gelu(gate(x))) -> transformers UMT5 (layer.0 = attention, layer.1 = ffn,
# wi_0 is the GELU-gated branch, wi_1 the linear one).
_BLOCK_MAP = [
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
]
_TOP_MAP = [("token_embedding.weight", "shared.weight"), ("norm.weight", "encoder.final_layer_norm.weight")]
_OFF2HF = dict(_BLOCK_MAP)
_HF2OFF = {hf: off for off, hf in _BLOCK_MAP}
_OFF_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_TIED_KEY = "encoder.embed_tokens.weight"  # tied to shared.weight; never stored separately


def official_to_hf_key(key: str) -> str | None:
    """Official Wan T5 name -> transformers UMT5EncoderModel name (None if the name is unknown)."""
    top = dict(_TOP_MAP)
    if key in top:
        return top[key]
    m = _OFF_BLOCK.match(key)
    if m and m.group(2) in _OFF2HF:
        return f"encoder.block.{m.group(1)}.{_OFF2HF[m.group(2)]}"
    return None


def hf_to_official_key(key: str) -> str | None:
    """Inverse of `official_to_hf_key` (None for names with no official counterpart)."""
    top = {hf: off for off, hf in _TOP_MAP}
    if key in top:
        return top[key]
    m = _HF_BLOCK.match(key)
    if m and m.group(2) in _HF2OFF:
        return f"blocks.{m.group(1)}.{_HF2OFF[m.group(2)]}"
    return None


def _config_from_official(sd: dict) -> UMT5Config:
    """Read the architecture off the tensor shapes (so tiny test checkpoints load through the same
    path); fall back to UMT5-XXL for anything absent, and let the key check report the damage."""
    cfg = dict(UMT5_XXL)
    if "token_embedding.weight" in sd:
        cfg["vocab_size"], cfg["d_model"] = sd["token_embedding.weight"].shape  # [V, D]
    layers = {int(m.group(1)) for k in sd if (m := _OFF_BLOCK.match(k))}
    if layers:
        cfg["num_layers"] = max(layers) + 1
    if "blocks.0.pos_embedding.embedding.weight" in sd:
        cfg["relative_attention_num_buckets"], cfg["num_heads"] = sd["blocks.0.pos_embedding.embedding.weight"].shape
    if "blocks.0.attn.q.weight" in sd:
        cfg["d_kv"] = sd["blocks.0.attn.q.weight"].shape[0] // cfg["num_heads"]  # [H*d_kv, D]
    if "blocks.0.ffn.fc1.weight" in sd:
        cfg["d_ff"] = sd["blocks.0.ffn.fc1.weight"].shape[0]  # [F, D]
    return _umt5_config(**cfg)


def _umt5_config(**kw) -> UMT5Config:
    # Wan's T5: gated tanh-GELU ffn, eps 1e-6, max relative distance 128; pad 0 / eos 1 as in UMT5.
    return UMT5Config(feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
                      relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False, **kw)


def _build_on_meta(config: UMT5Config, hf_sd: dict, source: str, dtype, device) -> UMT5EncoderModel:
    """Check `hf_sd` against the architecture, then assign the tensors into a meta-built model."""
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != _TIED_KEY}
    sd = dict(hf_sd)
    if _TIED_KEY in sd and "shared.weight" not in sd:
        sd["shared.weight"] = sd[_TIED_KEY]
    sd.pop(_TIED_KEY, None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        def head(items):
            return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")
        raise ValueError(
            f"text encoder checkpoint {source} does not match UMT5 (layers={config.num_layers}, "
            f"d_model={config.d_model}, heads={config.num_heads}): "
            f"{len(missing)} missing keys [{head(missing)}]; {len(unexpected)} unexpected keys "
            f"[{head(unexpected)}]; {len(shapes)} shape mismatches [{head(shapes)}]")
    sd = {k: v.to(dtype=dtype) for k, v in sd.items()}
    sd[_TIED_KEY] = sd["shared.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie: assign made two Parameters
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # nothing may stay on meta, or the first forward fails far from here
        raise ValueError(f"text encoder {source}: tensors left unloaded: {leftover[:5]}")
    return model.to(device).eval().requires_grad_(False)


def load_official_state_dict(pth: Path, dtype=torch.bfloat16, device="cpu") -> UMT5EncoderModel:
    """Load the official .pth (untrusted pickle: weights_only, never full unpickling)."""
    try:
        try:
            raw = torch.load(pth, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            raw = torch.load(pth, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something: never retry unsafely
        raise ValueError(f"text encoder checkpoint {pth} is not a plain tensor pickle "
                         f"(refused by torch.load(weights_only=True)): {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"text encoder checkpoint {pth} holds a {type(raw).__name__}, not a state dict")
    hf_sd = {}
    for k, v in raw.items():
        new = official_to_hf_key(k)
        hf_sd[new if new is not None else f"<unmapped official key> {k}"] = v
    return _build_on_meta(_config_from_official(raw), hf_sd, str(pth), dtype, device)


def _load_diffusers_text_encoder(folder: Path, dtype, device) -> UMT5EncoderModel:
    from safetensors.torch import load_file

    config = UMT5Config.from_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    if not files:  # older saves: pytorch_model.bin, also a pickle
        for f in sorted(folder.glob("*.bin")):
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    if not sd:
        raise ValueError(f"no weights (*.safetensors or *.bin) found in {folder}")
    config.dropout_rate = 0.0
    return _build_on_meta(config, sd, str(folder), dtype, device)


# ---------------------------------------------------------------------------------------------
# Prompt cleaning: the reference's HuggingfaceTokenizer(clean='whitespace') does
# ftfy.fix_text -> html.unescape twice -> strip -> collapse \s+ to one space -> strip.
# ftfy matters for Chinese prompts: it turns full-width punctuation (，) into ASCII (,).
_FULLWIDTH = re.compile("[\u3000\uff01-\uff5e\ufb00-\ufb06]")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def _fix_text_fallback(text: str) -> str:
    """Subset of ftfy.fix_text without ftfy: width, ligature and quote fixes, NFC (no mojibake repair)."""
    text = _FULLWIDTH.sub(lambda m: unicodedata.normalize("NFKC", m.group(0)), text)
    return unicodedata.normalize("NFC", text.translate(_QUOTES))


def clean_prompt(text: str) -> str:
    text = ftfy.fix_text(text) if ftfy is not None else _fix_text_fallback(text)
    text = html.unescape(html.unescape(text)).strip()
    return _re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Tokenise + encode prompts into the zero-padded context tensor the DiT cross-attends to."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = TEXT_LEN, device="cpu",
                 dtype=torch.bfloat16):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = int(text_len)
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenise; returns (ids [B, L], mask [B, L]) padded to the longest prompt (≤ text_len)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        cleaned = []
        for i, p in enumerate(prompts):
            c = clean_prompt(p)
            if not c:
                raise ValueError(f"prompt is empty after cleaning (prompt {i}: {p!r})")
            cleaned.append(c)
        # Padding to the longest prompt rather than to text_len: the masked keys contribute exactly
        # nothing, so real rows are the same as the reference's 512-padded pass, for less compute.
        tok = self.tokenizer(cleaned, padding="longest", truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_tensors="pt")
        return tok.input_ids, tok.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)  # [B, L], [B, L]
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        lengths = mask.sum(dim=1).tolist()  # real tokens per prompt, </s> included
        out = hidden.new_zeros(ids.shape[0], self.text_len, hidden.shape[-1])  # [B, text_len, D]
        for b, n in enumerate(lengths):
            out[b, :n] = hidden[b, :n]  # rows past n stay exactly zero
        return out

    __call__ = encode


def load_text_encoder(path, device="cpu", dtype=torch.bfloat16, text_len: int = TEXT_LEN) -> TextEncoder:
    """Load from an official Wan-AI root (or its .pth directly) or a diffusers pipeline root."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pth":
        pth, tok_dir = path, path.parent / OFFICIAL_TOKENIZER_DIR
    elif (path / OFFICIAL_T5_FILE).exists():
        pth, tok_dir = path / OFFICIAL_T5_FILE, path / OFFICIAL_TOKENIZER_DIR
    elif (path / "text_encoder").is_dir():
        pth, tok_dir = None, path / "tokenizer"
    else:
        raise ValueError(f"{path}: expected an official Wan root ({OFFICIAL_T5_FILE} + "
                         f"{OFFICIAL_TOKENIZER_DIR}/) or a diffusers root (text_encoder/ + tokenizer/)")
    if not tok_dir.is_dir():
        raise ValueError(f"tokenizer folder {tok_dir} not found")
    if pth is not None:
        model = load_official_state_dict(pth, dtype=dtype, device=device)
    else:
        model = _load_diffusers_text_encoder(path / "text_encoder", dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return TextEncoder(model, tokenizer, text_len=text_len, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
_TINY_CORPUS = [
    "a cat sits on a red sofa in the warm evening light",
    "a drone shot over snowy mountains at sunrise, cinematic",
    "two astronauts walk slowly across the surface of the moon",
    "close up of rain drops falling on a green leaf",
    "a city street at night with neon signs and reflections",
    "an old man plays the violin in a quiet park",
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small WordPiece tokenizer built from a fixed vocabulary (nothing downloaded, nothing trained: trained
    tokenizers are not reproducible run to run, and a seed must give the same video every time).

    UMT5's special ids: pad 0, eos 1, unk 2; </s> is appended to every sequence as T5 does. The vocabulary is
    the tiny corpus's words plus single characters and their continuations, so any ASCII prompt tokenizes."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    words = sorted({w for line in _TINY_CORPUS for w in line.replace(",", " ").split()})
    tokens = ["<pad>", "</s>", "<unk>"] + words + [c for c in chars if c not in words] + [f"##{c}" for c in chars]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=TEXT_LEN)


def build_tiny_text_encoder(seed: int = 0, d_model: int = 32, text_len: int = TEXT_LEN,
                            dtype=torch.float32) -> TextEncoder:
    """Random 2-layer UMT5 (4 heads) + tiny tokenizer, for tests and smoke runs."""
    tokenizer = build_tiny_tokenizer()
    config = _umt5_config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
                          num_layers=2, num_heads=4, relative_attention_num_buckets=32)
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG alone
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
        # HF's init gives near-identical rows at this size; spread the weights so tests see structure.
        for p in model.parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return TextEncoder(model, tokenizer, text_len=text_len, dtype=dtype)


def build_random_umt5_xxl(device="cpu", dtype=torch.bfloat16, seed: int = 0, text_len: int = TEXT_LEN) -> TextEncoder:
    """UMT5-XXL's shape (vocab 256384, d_model 4096, 24 layers) with random weights, made directly on `device` in
    `dtype`: benchmarks time the real encoder without a checkpoint. The tokenizer is the tiny one (its ids are
    valid in the big vocabulary); the text it produces is meaningless, its cost is not."""
    config = _umt5_config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                          relative_attention_num_buckets=32)
    prev = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = UMT5EncoderModel(config)
        finally:
            torch.set_default_dtype(prev)
    return TextEncoder(model, build_tiny_tokenizer(), text_len=text_len, device=device, dtype=dtype)
