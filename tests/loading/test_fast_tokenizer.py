"""velodiff's CLIP tokenizer (velodiff.loading.fast_tokenizer) against transformers' (the oracle) on the same
folders: ids, masks, word spans, tokens and the prompt-warning analysis are equal on a few hundred varied prompts
for the digits tokenizer, the test fixtures' tokenizer, and a CLIP byte-level BPE vocabulary (CLIP's layout:
256 byte symbols, the same with ``</w>``, merges, two special tokens; merges learned here from text, offline), with
CLIP's ``<|endoftext|>`` padding and SD 2's ``!`` padding. Folders it cannot reproduce exactly fall back to
transformers, each for its stated reason."""
import json
import os
import random
import shutil

import pytest
import torch

from velodiff.loading import BUILTIN_MODELS, load_tokenizer
from velodiff.loading.fast_tokenizer import CLIP_SPLIT, CLIPTokenizer, NotReproducible, load_clip_tokenizer
from velodiff.loading.tokenizers import tokenizer_from_folder
from velodiff.pipelines.base import prompt_token_issues

transformers = pytest.importorskip("transformers")

DIGITS = os.path.join(BUILTIN_MODELS["digits"], "tokenizer")

PIECES = [
    "a handwritten 7", "the digit seven", "number SEVEN", "Digit 7", "a 7", "A RED FOX", "lower newer wider lowest",
    "It's a cat's toy; they'll see, we're sure I'd've", "I'M HERE, YOU'RE THERE", "don't", "rock'n'roll",
    "e-mail: foo@bar.com", "https://example.com/path?q=1&x=2#frag", "3.14159 and 1,000,000", "12345678901234567890",
    "C++ / C# / F#", "naïve café résumé", "Ünïcödé ÀÉÎÕÜ", "straße STRASSE", "İstanbul ıi", "日本語のテキスト",
    "中文 提示词", "한국어 문장", "Привет, мир", "مرحبا بالعالم", "שלום עולם", "emoji 🦊🔥👍🏽 🇫🇷",
    "tab\tseparated\nnew line\r\nwindows", "  leading and trailing  ", "multiple     spaces", "zero\u200bwidth",
    "combining e\u0301 vs \u00e9", "cafe\u0301", "ligature \ufb01 \ufb02", "fullwidth ＡＢＣ１２３", "<|endoftext|> inside",
    "<|startoftext|>start", "<unk> token text", "!!!???...", "(parentheses) [brackets] {braces}",
    "\"quoted\" 'single' `back`", "~`@#$%^&*_+=|\\", "x", "7", "ABC", "½ ² ³ ⅷ", "\u00a0no-break\u2003em",
    "newer lowest wider low lower", "seven eight nine zero one two three four five six", "a purple 4 write!",
]


def _prompts(n: int = 300):
    """Varied prompts: the pieces, their case variants, random mixes, the empty string, and very long ones."""
    rng = random.Random(0)
    out = list(PIECES) + ["", " ", "\n"]
    out += [p.upper() for p in PIECES[:20]] + [p.title() for p in PIECES[20:40]] + [p.swapcase() for p in PIECES[40:]]
    while len(out) < n - 3:
        parts = rng.sample(PIECES, rng.randint(2, 4))
        sep = rng.choice([" ", ", ", "  ", "\t", "-", "", " | "])
        text = sep.join(parts)
        out.append(rng.choice([str.lower, str.upper, str.title, lambda s: s])(text))
    out += [" ".join(rng.choice(PIECES) for _ in range(200)), "word " * 500, "x" * 3000]
    return out


PROMPTS = _prompts()


def _bytes_to_unicode():
    """CLIP's (GPT-2's) byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _clip_bpe_files(folder: str, n_merges: int = 1500) -> str:
    """vocab.json + merges.txt in CLIP's layout, the merges learned with the tokenizers library's BPE trainer over
    CLIP's normalizer and pre-tokenizer from the repository README and these tests' prompts."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_SPLIT), "removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=2 * 256 + n_merges, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8") as f:
        corpus = f.read().split("\n") + PROMPTS
    tok.train_from_iterator(corpus, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    assert len(merges) > 500 and len(vocab) == 512 + len(merges) + 2
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: (tokenizer folder with tokenizer.json, transformers' tokenizer built from the source files)}."""
    from fixtures import clip_tokenizer
    root = tmp_path_factory.mktemp("tokenizers")
    out = {"digits": (DIGITS, transformers.AutoTokenizer.from_pretrained(DIGITS))}
    fixture = clip_tokenizer()
    fixture.save_pretrained(str(root / "fixture"))
    out["fixture"] = (str(root / "fixture"), fixture)
    slow = _clip_bpe_files(str(root / "clip_bpe_files"))
    for name, pad in (("clip_bpe", "<|endoftext|>"), ("clip_bpe_pad_bang", "!")):
        tok = transformers.CLIPTokenizer.from_pretrained(slow, pad_token=pad)
        tok.model_max_length = 77
        tok.save_pretrained(str(root / name))
        out[name] = (str(root / name), tok)
    return out


NAMES = ["digits", "fixture", "clip_bpe", "clip_bpe_pad_bang"]
CALLS = [dict(padding="max_length", max_length=None, truncation=True, return_tensors="pt"),
         dict(padding="max_length", truncation=True, return_tensors="pt"),
         dict(padding="max_length", max_length=24, truncation=True, return_tensors="pt"),
         dict(padding=True, return_tensors="pt"), dict(padding="longest", truncation=True),
         dict(truncation=True), dict(max_length=10), dict(add_special_tokens=False),
         dict(add_special_tokens=True, truncation=False, verbose=False), dict(return_attention_mask=False), dict()]


def _same(a, b):
    assert set(a.keys()) == set(b.keys())
    for key in a.keys():
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype == torch.long and torch.equal(x, y), key
        else:
            assert x == y, key


@pytest.mark.parametrize("name", NAMES)
def test_same_pipeline_as_transformers(folders, name):
    folder, theirs = folders[name]
    ours = load_clip_tokenizer(folder)
    loaded = transformers.AutoTokenizer.from_pretrained(folder)
    drop = ("padding", "truncation")  # set per call by both
    mine = {k: v for k, v in json.loads(ours.backend_tokenizer.to_str()).items() if k not in drop}
    for ref in (theirs, loaded):
        assert mine == {k: v for k, v in json.loads(ref.backend_tokenizer.to_str()).items() if k not in drop}
    for attr in ("model_max_length", "bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id",
                 "eos_token_id", "pad_token_id", "unk_token_id", "vocab_size", "padding_side", "truncation_side"):
        assert getattr(ours, attr) == getattr(loaded, attr), attr
    assert ours.get_vocab() == loaded.get_vocab() and len(ours) == len(loaded)
    if name == "clip_bpe_pad_bang":
        assert ours.pad_token == "!" and ours.pad_token_id != ours.eos_token_id


@pytest.mark.parametrize("name", NAMES)
def test_ids_equal_transformers_on_varied_prompts(folders, name):
    folder, theirs = folders[name]
    ours = load_clip_tokenizer(folder)
    for kwargs in CALLS:
        kwargs = {k: v for k, v in kwargs.items() if not (k == "max_length" and v is None)}
        for start in range(0, len(PROMPTS), 25):
            batch = PROMPTS[start:start + 25]
            _same(ours(batch, **kwargs), theirs(batch, **kwargs))
    for prompt in PROMPTS:
        _same(ours(prompt), theirs(prompt))
        _same(ours(prompt, padding="max_length", truncation=True, return_tensors="pt"),
              theirs(prompt, padding="max_length", truncation=True, return_tensors="pt"))


@pytest.mark.parametrize("name", NAMES)
def test_word_spans_tokens_and_prompt_warnings_equal_transformers(folders, name):
    folder, theirs = folders[name]
    ours = load_clip_tokenizer(folder)
    a = ours(PROMPTS, add_special_tokens=True, truncation=False, verbose=False)
    b = theirs(PROMPTS, add_special_tokens=True, truncation=False, verbose=False)
    for i, ids in enumerate(a["input_ids"]):
        assert a.word_ids(i) == b.word_ids(i) and a.tokens(i) == b.tokens(i)
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
        for w in {w for w in a.word_ids(i) if w is not None}:
            assert tuple(a.word_to_chars(i, w)) == tuple(b.word_to_chars(i, w))
    assert tuple(a.word_to_chars(0)) == tuple(b.word_to_chars(0))  # one index: a word of the first text
    assert ours.convert_ids_to_tokens(5) == theirs.convert_ids_to_tokens(5)
    assert ours.convert_tokens_to_ids(["<|endoftext|>", "not-a-token"]) == \
        theirs.convert_tokens_to_ids(["<|endoftext|>", "not-a-token"])
    for start in range(0, len(PROMPTS), 10):
        batch = PROMPTS[start:start + 10]
        assert prompt_token_issues(ours, batch, ours.model_max_length) == \
            prompt_token_issues(theirs, batch, theirs.model_max_length)
    assert prompt_token_issues(ours, ["a purple 7 write!"], 16)[1] == (["purple", "write", "!"] if name == "digits"
                                                                      else prompt_token_issues(theirs,
                                                                                               ["a purple 7 write!"],
                                                                                               16)[1])


def test_call_errors_name_the_argument():
    ours = load_clip_tokenizer(DIGITS)
    with pytest.raises(TypeError, match="text must be a string or a list of strings, got int"):
        ours(7)
    with pytest.raises(TypeError, match="text must be a string or a list of strings, got list"):
        ours(["a", 7])
    with pytest.raises(ValueError, match="return_tensors must be None or 'pt', got 'np'"):
        ours("a 7", return_tensors="np")
    with pytest.raises(ValueError, match="padding must be one of .* got 'max'"):
        ours("a 7", padding="max")
    with pytest.raises(ValueError, match="truncation must be one of .* got 'only_second'"):
        ours("a 7", truncation="only_second")
    with pytest.raises(ValueError, match="max_length must be a positive integer or None, got 0"):
        ours("a 7", max_length=0)
    with pytest.raises(ValueError, match="different numbers of tokens.*padding=True"):
        ours(["a 7", "a handwritten seven"], return_tensors="pt")
    with pytest.raises(TypeError, match="stride"):
        ours("a 7", stride=2)


def test_save_pretrained_copies_the_files(folders, tmp_path):
    folder, _ = folders["clip_bpe"]
    ours = load_clip_tokenizer(folder)
    written = ours.save_pretrained(str(tmp_path / "copy"))
    assert {os.path.basename(p) for p in written} >= {"tokenizer.json", "tokenizer_config.json"}
    again = load_clip_tokenizer(str(tmp_path / "copy"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
    _same(again(PROMPTS[:50], padding="max_length", truncation=True, return_tensors="pt"),
          theirs(PROMPTS[:50], padding="max_length", truncation=True, return_tensors="pt"))


def test_loaders_pick_velodiff_tokenizer_and_keep_user_objects(folders):
    assert type(tokenizer_from_folder(DIGITS)) is CLIPTokenizer
    assert type(load_tokenizer("digits", "tokenizer")) is CLIPTokenizer  # single files: a pipeline folder's
    user = folders["fixture"][1]
    assert load_tokenizer(user, "tokenizer") is user  # a tokenizer object is used as given


# ---- what falls back to transformers, and why ------------------------------------------------------------------

def _copy(tmp_path, name="tok"):
    folder = tmp_path / name
    shutil.copytree(DIGITS, folder)
    return folder


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _falls_back(folder, match):
    with pytest.raises(NotReproducible, match=match):
        load_clip_tokenizer(str(folder))
    tok = tokenizer_from_folder(str(folder))
    assert type(tok).__module__.startswith("transformers.")
    return tok


def test_slow_tokenizer_files_fall_back(folders, tmp_path):
    folder = tmp_path / "slow"
    os.makedirs(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(folders["clip_bpe"][0], "..", "clip_bpe_files", name), folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77}))
    tok = _falls_back(folder, "no tokenizer.json")
    assert tok("a photo").input_ids == folders["clip_bpe"][1]("a photo").input_ids


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["normalizer"]["normalizers"].pop(), "its normalizer is not CLIP's"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "its pre_tokenizer"),
    (lambda d: d["post_processor"].update(trim_offsets=True), "its post_processor"),
    (lambda d: d["model"].update(end_of_word_suffix=""), "its BPE settings are not CLIP's"),
    (lambda d: d["model"].update(type="WordPiece"), "cannot read|not a BPE model"),
    (lambda d: d["added_tokens"][0].update(normalized=True), "added tokens are not exactly the special tokens"),
    (lambda d: d["added_tokens"].append({**d["added_tokens"][2], "id": 149, "content": "seven</w>"}),
     "added tokens"),
    (lambda d: d["padding"].update(direction="Left"), "padding direction 'left'"),
])
def test_a_tokenizer_json_that_differs_from_clip_falls_back(tmp_path, edit, match):
    folder = _copy(tmp_path)
    _edit_json(folder / "tokenizer.json", edit)
    if "WordPiece" in match or "BPE model" in match:  # not a valid file for transformers either
        with pytest.raises(NotReproducible, match=match):
            load_clip_tokenizer(str(folder))
    else:
        _falls_back(folder, match)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(tokenizer_class="T5TokenizerFast"), "tokenizer_class='T5TokenizerFast'"),
    (lambda c: c.update(padding_side="left"), "padding_side='left'"),
    (lambda c: c.update(split_special_tokens=True), "split_special_tokens=True"),
    (lambda c: c.update(do_something_new=1), "setting 'do_something_new' is not one"),
    (lambda c: c.pop("unk_token"), "no unk_token"),
    (lambda c: c.update(model_max_length=int(1e30)), "model_max_length="),
    (lambda c: c.update(bos_token={"content": "<|startoftext|>", "normalized": True}), "has flags"),
    (lambda c: c.update(unk_token="<|endoftext|>"), "BPE settings|added tokens"),
])
def test_a_tokenizer_config_it_does_not_know_falls_back(tmp_path, edit, match):
    folder = _copy(tmp_path)
    _edit_json(folder / "tokenizer_config.json", edit)
    with pytest.raises(NotReproducible, match=match):
        load_clip_tokenizer(str(folder))


def test_extra_files_that_change_tokens_fall_back(tmp_path):
    folder = _copy(tmp_path, "added")
    (folder / "added_tokens.json").write_text(json.dumps({"<new>": 150}))
    with pytest.raises(NotReproducible, match="added_tokens.json"):
        load_clip_tokenizer(str(folder))
    folder = _copy(tmp_path, "map")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>"}))
    _falls_back(folder, "special_tokens_map.json: differs")
    folder = _copy(tmp_path, "map_same")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    assert type(load_clip_tokenizer(str(folder))) is CLIPTokenizer
