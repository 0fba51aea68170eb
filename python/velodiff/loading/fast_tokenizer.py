"""CLIP tokenizers read straight through the ``tokenizers`` library, without importing transformers.

transformers' ``CLIPTokenizer`` (5.x) is a thin layer over a ``tokenizers.Tokenizer``: a byte-level BPE with the
``</w>`` word suffix, CLIP's normalizer (NFC, whitespace runs to one space, lowercase) and pre-tokenizer, a
RoBERTa-style post-processor adding ``<|startoftext|>`` / ``<|endoftext|>``, and the special tokens as added
tokens; a call sets the backend's padding and truncation and runs ``encode_batch``. :class:`CLIPTokenizer` here
does the same over the folder's ``tokenizer.json``.

It is used only where it is exact: :func:`load_clip_tokenizer` accepts a folder only when ``tokenizer_config.json``
names a CLIP tokenizer with settings from a known list and ``tokenizer.json`` holds exactly the pipeline that
transformers' ``CLIPTokenizer`` builds (compared section by section with one built the way transformers builds
it); anything else raises :class:`NotReproducible` with the reason, and :func:`velodiff.loading.tokenizers.
tokenizer_from_folder` then loads transformers' tokenizer instead. ``tests/loading/test_fast_tokenizer.py``
compares ids, masks, word spans and tokens with transformers' on a few hundred prompts.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from typing import Any, Dict, List, Optional, Sequence, Union

#: files a tokenizer folder may hold besides ``tokenizer.json`` and ``tokenizer_config.json`` (copied on save)
EXTRA_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json")
#: CLIP's pre-tokenizer pattern (transformers' CLIPTokenizer)
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
#: tokenizer_config.json keys that leave encoding as transformers' CLIPTokenizer does it, with the values allowed
#: (None: any value; decoding-only or bookkeeping keys)
CONFIG_KEYS: Dict[str, Optional[tuple]] = {
    "tokenizer_class": ("CLIPTokenizer", "CLIPTokenizerFast"), "backend": ("tokenizers",),
    "padding_side": ("right",), "truncation_side": ("right",), "split_special_tokens": (False,),
    "add_prefix_space": (False,), "model_input_names": (["input_ids", "attention_mask"],),
    "additional_special_tokens": ([],), "extra_special_tokens": ([], {}),
    "bos_token": None, "eos_token": None, "pad_token": None, "unk_token": None, "model_max_length": None,
    "added_tokens_decoder": None, "clean_up_tokenization_spaces": None, "do_lower_case": None, "errors": None,
    "is_local": None, "local_files_only": None, "name_or_path": None, "special_tokens_map_file": None,
    "processor_class": None,
}
_LARGE = int(1e20)  # transformers: a model_max_length above this means "no limit"
CharSpan = namedtuple("CharSpan", ["start", "end"])


class NotReproducible(ValueError):
    """The folder's tokenizer is not one :class:`CLIPTokenizer` reproduces exactly (the message says why)."""


def _token_content(value, where: str) -> str:
    """A special token from tokenizer_config.json / special_tokens_map.json: a string, or an AddedToken dict with
    the flags transformers gives special tokens (not normalized, no strip, not single-word)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: value.get(k, False) for k in ("lstrip", "rstrip", "single_word", "normalized")}
        if any(flags.values()):
            raise NotReproducible(f"{where}: special token {value['content']!r} has flags {flags}")
        return value["content"]
    raise NotReproducible(f"{where}: special token {value!r} is neither a string nor an AddedToken")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise NotReproducible(f"{path}: cannot read ({e})") from None


def _canonical(specials: Dict[str, str], ids: Dict[str, int]) -> Dict[str, Any]:
    """The tokenizer.json sections (vocabulary aside) of the backend transformers' CLIPTokenizer builds."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab={}, merges=[], dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((specials["eos_token"], ids["eos_token"]),
                                                      (specials["bos_token"], ids["bos_token"]), False, False)
    return json.loads(tok.to_str())


def _check_config(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        raise NotReproducible(f"{folder}: no tokenizer_config.json")
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise NotReproducible(f"{path}: not a JSON object")
    for key, value in cfg.items():
        if key not in CONFIG_KEYS:
            raise NotReproducible(f"{path}: setting {key!r} is not one velodiff's CLIP tokenizer knows")
        allowed = CONFIG_KEYS[key]
        if allowed is not None and value not in allowed:
            raise NotReproducible(f"{path}: {key}={value!r} (velodiff's CLIP tokenizer reproduces {allowed})")
    if "tokenizer_class" not in cfg:
        raise NotReproducible(f"{path}: no tokenizer_class")
    missing = [name for name in SPECIAL_NAMES if name not in cfg]
    if missing:
        raise NotReproducible(f"{path}: no {', '.join(missing)}")
    max_len = cfg.get("model_max_length")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 0 < max_len <= _LARGE:
        raise NotReproducible(f"{path}: model_max_length={max_len!r}")
    return cfg


def load_clip_tokenizer(folder: Union[str, os.PathLike]) -> "CLIPTokenizer":
    """velodiff's :class:`CLIPTokenizer` for a tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``),
    or :class:`NotReproducible` saying why it would not be exactly transformers' ``CLIPTokenizer``."""
    from tokenizers import Tokenizer

    folder = os.fspath(folder)
    cfg = _check_config(folder)
    if os.path.exists(os.path.join(folder, "added_tokens.json")):
        raise NotReproducible(f"{folder}: added_tokens.json (extra added tokens)")
    specials = {name: _token_content(cfg[name], f"{folder}/tokenizer_config.json") for name in SPECIAL_NAMES}
    map_path = os.path.join(folder, "special_tokens_map.json")
    if os.path.isfile(map_path):
        extra = _read_json(map_path)
        if not isinstance(extra, dict) or set(extra) - set(SPECIAL_NAMES) or any(
                _token_content(v, map_path) != specials[k] for k, v in extra.items()):
            raise NotReproducible(f"{map_path}: differs from tokenizer_config.json")
    tok_path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise NotReproducible(f"{folder}: no tokenizer.json (slow-tokenizer files only)")
    try:
        backend = Tokenizer.from_file(tok_path)
    except Exception as e:  # the Rust library raises plain Exceptions for malformed files
        raise NotReproducible(f"{tok_path}: the tokenizers library cannot read it ({e})") from None
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise NotReproducible(f"{tok_path}: not a BPE model")
    ids = {name: vocab.get(token) for name, token in specials.items()}
    if any(i is None for i in ids.values()):
        raise NotReproducible(f"{tok_path}: a special token is not in the vocabulary: "
                              f"{[specials[n] for n, i in ids.items() if i is None]}")
    want = _canonical(specials, ids)
    for section in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if data.get(section) != want[section]:
            raise NotReproducible(f"{tok_path}: its {section} is not CLIP's")
    if {k: v for k, v in model.items() if k not in ("vocab", "merges")} != \
            {k: v for k, v in want["model"].items() if k not in ("vocab", "merges")}:
        raise NotReproducible(f"{tok_path}: its BPE settings are not CLIP's")
    added = {(t["id"], t["content"]): t for t in data.get("added_tokens", [])}
    expected = {(ids[n], specials[n]) for n in SPECIAL_NAMES}
    if set(added) != expected or any(not t["special"] or t["normalized"] or t["lstrip"] or t["rstrip"]
                                     or t["single_word"] for t in added.values()):
        raise NotReproducible(f"{tok_path}: its added tokens are not exactly the special tokens")
    decoder_cfg = cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder_cfg, dict) or {(int(i), _token_content(t, "added_tokens_decoder"))
                                             for i, t in decoder_cfg.items()} - expected:
        raise NotReproducible(f"{folder}/tokenizer_config.json: added_tokens_decoder differs from tokenizer.json")
    for name, setting in (("padding", backend.padding), ("truncation", backend.truncation)):
        if setting is not None and setting.get("direction") != "right":
            raise NotReproducible(f"{tok_path}: {name} direction {setting.get('direction')!r}")
    return CLIPTokenizer(backend, model_max_length=cfg["model_max_length"], folder=folder, **specials)


class Encoding(dict):
    """transformers' BatchEncoding for what pipelines read: ``enc.input_ids`` / ``enc["input_ids"]``,
    ``attention_mask``; ``word_ids(i)`` and ``word_to_chars(i, w)`` (the word's span in text ``i``)."""

    def __init__(self, data: Dict[str, Any], encodings: List[Any]):
        super().__init__(data)
        self.encodings = encodings

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def word_ids(self, batch_index: int = 0) -> List[Optional[int]]:
        return self.encodings[batch_index].word_ids

    def tokens(self, batch_index: int = 0) -> List[str]:
        return self.encodings[batch_index].tokens

    def word_to_chars(self, batch_or_word_index: int, word_index: Optional[int] = None) -> Optional[CharSpan]:
        batch, word = (0, batch_or_word_index) if word_index is None else (batch_or_word_index, word_index)
        span = self.encodings[batch].word_to_chars(word)
        return CharSpan(*span) if span is not None else None


class CLIPTokenizer:
    """transformers' ``CLIPTokenizer`` over the same ``tokenizers`` backend, for the calls pipelines make:
    ``tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids`` (int64
    [B, max_length]), ``tok(texts, truncation=False)`` (lists of ids, word spans), ``model_max_length``,
    ``unk_token_id`` / ``pad_token_id`` / ..., ``get_vocab()``, ``convert_ids_to_tokens``, ``save_pretrained``
    (copies the folder's tokenizer files). Build it with :func:`load_clip_tokenizer`."""

    is_fast = True
    padding_side = truncation_side = "right"

    def __init__(self, backend, *, model_max_length: int, bos_token: str, eos_token: str, pad_token: str,
                 unk_token: str, folder: str):
        self._backend = backend
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.name_or_path = folder

    def __repr__(self) -> str:
        return (f"velodiff CLIPTokenizer({self.name_or_path!r}, vocab_size={len(self)}, "
                f"model_max_length={self.model_max_length})")

    @property
    def backend_tokenizer(self):
        return self._backend

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]):
        """A token's id (the unknown token's for one not in the vocabulary), or a list of them."""
        if isinstance(tokens, str):
            index = self._backend.token_to_id(tokens)
            return self._backend.token_to_id(self.unk_token) if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]):
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    bos_token_id = property(lambda self: self.convert_tokens_to_ids(self.bos_token))
    eos_token_id = property(lambda self: self.convert_tokens_to_ids(self.eos_token))
    pad_token_id = property(lambda self: self.convert_tokens_to_ids(self.pad_token))
    unk_token_id = property(lambda self: self.convert_tokens_to_ids(self.unk_token))

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> Dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def _strategies(self, padding, truncation, max_length):
        """(pad: None | "longest" | "max_length", truncate: bool, max_length) as transformers resolves them."""
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers truncates when only max_length is given
        pads = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
        truncs = {None: False, False: False, "do_not_truncate": False, True: True, "longest_first": True,
                  "only_first": True}
        if not isinstance(padding, (bool, str)) or padding not in pads:
            raise ValueError(f"padding must be one of {list(pads)}, got {padding!r}")
        if not isinstance(truncation, (bool, str, type(None))) or truncation not in truncs:
            raise ValueError(f"truncation must be one of {list(truncs)}, got {truncation!r}")
        pad, truncate = pads[padding], truncs[truncation]
        if max_length is None and (pad == "max_length" or truncate):
            max_length = self.model_max_length
        return pad, truncate, max_length

    def __call__(self, text: Union[str, Sequence[str]], add_special_tokens: bool = True,
                 padding: Union[bool, str] = False, truncation: Union[bool, str, None] = None,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = None,
                 return_attention_mask: Optional[bool] = None, verbose: bool = True) -> Encoding:
        """Token ids of ``text`` (a string, or a list of strings), as transformers' tokenizer call with the same
        arguments gives them: ``input_ids`` and ``attention_mask``, lists (one text: un-nested) or, with
        ``return_tensors="pt"``, int64 tensors [B, L]. ``verbose`` is accepted and ignored (transformers uses it
        for a log message)."""
        batched = not isinstance(text, str)
        texts = list(text) if batched and isinstance(text, (list, tuple)) else [text]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        pad, truncate, max_length = self._strategies(padding, truncation, max_length)
        backend = self._backend
        if truncate:
            backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
        else:
            backend.no_truncation()
        if pad is not None:
            backend.enable_padding(direction="right", pad_id=self.pad_token_id, pad_type_id=0,
                                   pad_token=self.pad_token, length=max_length if pad == "max_length" else None,
                                   pad_to_multiple_of=None)
        else:
            backend.no_padding()
        encodings = backend.encode_batch(texts, add_special_tokens=bool(add_special_tokens))
        data: Dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_attention_mask is None or return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if return_tensors == "pt":
            import torch

            if len({len(ids) for ids in data["input_ids"]}) > 1:
                raise ValueError("the texts give different numbers of tokens, so they do not stack into one "
                                 "tensor; pass padding=True or padding='max_length'")
            data = {k: torch.tensor(v, dtype=torch.long) for k, v in data.items()}
        elif not batched:
            data = {k: v[0] for k, v in data.items()}
        return Encoding(data, encodings)

    def save_pretrained(self, folder: Union[str, os.PathLike]):
        """Copy the tokenizer files this tokenizer was read from into ``folder`` (created if needed); returns
        the paths written."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        written = []
        for name in ("tokenizer.json", "tokenizer_config.json") + EXTRA_FILES:
            src = os.path.join(self.name_or_path, name)
            if os.path.isfile(src):
                written.append(shutil.copyfile(src, os.path.join(folder, name)))
        return tuple(written)
