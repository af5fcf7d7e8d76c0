#!/usr/bin/env python3
"""fuzz/make_corpus.py — writes the file seeds of fuzz/corpus/ from the test fixtures.

    python3 fuzz/make_corpus.py        (from the repository root; `make fuzz-seeds` writes
                                        the comm_unpack seeds, which need comm_pack)

tok/         tokenizer.json files, each followed by a NUL byte and a text: stories260K and its
             Metaspace variant, gpt2 and the Llama-3-style fixture cut to their first 300
             merges (a 1.3 MB file would make every run slow), and small hand-made ones
             (Split behaviours, Digits, added tokens with lstrip/rstrip/single_word).
tok_text/    the texts of tests/fixtures/tok/stories260K.json (first 1 KB), each behind a
             byte choosing the tokenizer.
safetensors/ small valid files (F32/F16/BF16, metadata, an empty tensor, a scalar) and the
             real headers of fixture models followed by the first 2 KB of their data (so
             their data_offsets run past the end: the rejection path on real headers).
"""
import json, os, struct

FIX = "tests/fixtures"
OUT = "fuzz/corpus"


def w(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def small_bpe(src, n_merges):
    d = json.load(open(src, encoding="utf-8"))
    m = d["model"]
    merges = m["merges"][:n_merges]
    keep = set()
    for t, i in m["vocab"].items():
        if i < 256:
            keep.add(t)
    out = []
    for mg in merges:
        a, b = mg.split(" ") if isinstance(mg, str) else mg
        if a in keep and b in keep:
            keep.add(a + b)
            out.append(mg)
    vocab = {t: i for t, i in m["vocab"].items() if t in keep}
    # renumber densely, added tokens after
    ids = sorted(vocab.values())
    remap = {old: new for new, old in enumerate(ids)}
    m["vocab"] = {t: remap[i] for t, i in vocab.items()}
    m["merges"] = out
    nv = len(ids)
    for k, a in enumerate(d.get("added_tokens") or []):
        a["id"] = nv + k
    pp = d.get("post_processor")
    def fix_pp(p):
        if not p:
            return
        if p.get("type") == "Sequence":
            for q in p["processors"]:
                fix_pp(q)
        if p.get("type") == "TemplateProcessing":
            for name, st in p["special_tokens"].items():
                st["ids"] = [a["id"] for a in d["added_tokens"] if a["content"] == name]
    fix_pp(pp)
    return json.dumps(d, ensure_ascii=False).encode()


TEXT = "Once upon a time, there was a little girl named Lily. It's 2024! café 日本 🍕 <s></s> <|endoftext|>\n\tend  ".encode()

w(f"{OUT}/tok/stories260K", open(f"{FIX}/stories260K/tokenizer.json", "rb").read() + b"\0" + TEXT)
w(f"{OUT}/tok/metaspace", open(f"{FIX}/tok/metaspace/tokenizer.json", "rb").read() + b"\0" + TEXT)
w(f"{OUT}/tok/gpt2-300", small_bpe(f"{FIX}/gpt2/tokenizer.json", 300) + b"\0" + TEXT)
w(f"{OUT}/tok/llama3style-300", small_bpe(f"{FIX}/tok/llama3style/tokenizer.json", 300) + b"\0" + TEXT)

VOCAB = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5, " ": 6, "<unk>": 7, "1": 8, "2": 9,
         "a ": 10, " b": 11, "  ": 12, "12": 13, "x": 16, "y": 17}
MERGES = [["b", "c"], ["a", " "], [" ", "b"], [" ", " "], "1 2"]
hand = {
    "split-isolated": {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated"},
    "split-removed-invert": {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed", "invert": True},
    "split-prev": {"type": "Split", "pattern": {"Regex": "b*"}, "behavior": "MergedWithPrevious"},
    "split-next": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithNext"},
    "split-contiguous": {"type": "Split", "pattern": {"String": " "}, "behavior": "Contiguous"},
    "digits": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      {"type": "ByteLevel", "add_prefix_space": True, "use_regex": False}]},
}
for name, pre in hand.items():
    d = {
        "added_tokens": [
            {"id": 20, "content": "<m>", "lstrip": True, "rstrip": True, "special": True},
            {"id": 21, "content": "<n>"},
            {"id": 22, "content": "xy", "single_word": True},
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": " +"}, "content": " "},
            {"type": "Prepend", "prepend": "a"}]},
        "pre_tokenizer": pre,
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<m>"}}, {"Sequence": {"id": "A"}}],
                           "special_tokens": {"<m>": {"id": "<m>", "ids": [20]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "a"}, "content": " "},
                                                     {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "ignore_merges": True, "vocab": VOCAB, "merges": MERGES},
    }
    w(f"{OUT}/tok/hand-{name}", json.dumps(d).encode() + b"\0" + b"a b  abc<m> xy axy 12 <n>zz")

cases = json.load(open(f"{FIX}/tok/stories260K.json", encoding="utf-8"))["cases"]
for k, c in enumerate(cases):
    for tk in range(3):  # first byte: the tokenizer (stories260K, gpt2, Llama-3 style), plain mode
        w(f"{OUT}/tok_text/case-{k:02d}-{tk}", bytes([tk]) + c["text"].encode()[:1024])


def st_file(tensors, meta=None):
    hdr, data = {}, b""
    if meta:
        hdr["__metadata__"] = meta
    for name, dt, shape, raw in tensors:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


w(f"{OUT}/safetensors/small-mixed", st_file([
    ("model.embed_tokens.weight", "F32", [2, 3], struct.pack("<6f", *range(6))),
    ("model.norm.weight", "F16", [3], b"\x00\x3c" * 3),
    ("lm_head.weight", "BF16", [3, 2], b"\x80\x3f" * 6),
], {"format": "pt"}))
w(f"{OUT}/safetensors/empty-and-scalar", st_file([
    ("empty", "F32", [0, 4], b""),
    ("scalar", "F32", [], struct.pack("<f", 1.5)),
]))
for model in ("stories260K", "dense", "mod"):
    raw = open(f"{FIX}/{model}/model.safetensors", "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    w(f"{OUT}/safetensors/{model}-header", raw[: 8 + n + 2048])
print("make_corpus: wrote", sum(len(fs) for _, _, fs in os.walk(OUT)), "files under", OUT)
