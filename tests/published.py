"""Published-model directories built offline for the tests, shaped as the models ship them:

- `deepseek_dir`: a DeepSeek-V3-style `tokenizer.json` (a byte-level BPE trained here with HF `tokenizers`, digits
  and CJK split first, `<｜begin▁of▁sentence｜>` added by the post-processor, DeepSeek's special tokens and two
  non-special added tokens `<think>` `</think>` as R1 has) and `tokenizer_config.json` with a chat template from
  `fixtures/published/` (DeepSeek-V3's by default);
- `kimi_dir`: a Moonlight / Kimi-style `tiktoken.model` with its special tokens in `tokenizer_config.json`'s
  `added_tokens_decoder`, optionally the tokenizer module whose `pat_str` gives the split pattern;
- `with_deepseek_model`: a random tiny `deepseek_v3` or `deepseek_v2` model's config and safetensors beside them
  (transformers, `hf_dirs`).
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "published"
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
DEEPSEEK_SPECIAL = (BOS, EOS, PAD, USER, ASSISTANT, "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
                    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<|im_start|>", "<|im_end|>")
DEEPSEEK_ADDED = ("<think>", "</think>")
KIMI_SPECIAL = ("[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                "<|im_middle|>", "[UNK]")
UNICODE = ("Ünïcödé façade naïve café — “quotes” ½ ¾; Ελληνικά; русский текст; 中文分词测试，日本語のテキスト；"
           "한국어 문장; emoji 🙂🚀👩‍💻 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢. ")


def corpus() -> list[str]:
    """Text to train the test vocabularies on: a few standard-library modules, prose and Unicode."""
    library = Path(sysconfig.get_paths()["stdlib"])
    texts = [(library / name).read_text(encoding="utf-8") for name in ("json/decoder.py", "textwrap.py", "shlex.py")]
    return texts + [UNICODE * 20, "The quick brown fox jumps over the lazy dog. 1234567890 " * 50,
                    "中文abc日本語def " * 40]


def deepseek_dir(out: Path, template: str | None = "deepseek_v3.jinja", vocab_size: int = 1200) -> Path:
    """A directory with a DeepSeek-V3-style tokenizer.json and tokenizer_config.json (chat template `template`
    from fixtures/published/, or none)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[\r\n]|\s?[A-Za-zµÀ-ÖØ-öø-ƺ]+|\s?[!-/:-~！-／：-～‘-‟　-。]+|\s+$|[^\r\n]"),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEEPSEEK_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(corpus(), trainer)
    hf.add_tokens([AddedToken(token, special=False, normalized=False) for token in DEEPSEEK_ADDED])
    hf.post_processor = processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                                      special_tokens=[(BOS, hf.token_to_id(BOS))])
    hf.save(str(out / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 16384,
              "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                            "rstrip": False, "single_word": False},
              "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True,
                            "rstrip": False, "single_word": False},
              "pad_token": PAD, "unk_token": None, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "LlamaTokenizerFast"}
    if template is not None:
        config["chat_template"] = (FIXTURES / template).read_text(encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


def kimi_dir(out: Path, module: bool = False, vocab_size: int = 1000, template: str = "kimi.jinja") -> Path:
    """A directory with a Kimi-style tiktoken.model and tokenizer_config.json (chat template `template` from
    fixtures/published/); with `module`, the tokenizer module `auto_map` names (its pat_str is the split pattern;
    transformers would need trust_remote_code to run it)."""
    from gpt_moe.data.tokenizer import mergeable_ranks, tiktoken_file_bytes, train_bpe

    out.mkdir(parents=True, exist_ok=True)
    ranks = mergeable_ranks(train_bpe(corpus(), vocab_size))
    # one token across a Han/Latin boundary: the default split pattern keeps "中文a" one piece and makes it, Kimi's
    # splits Han from Latin and never does (the tests see which pattern is in use)
    assert "中文".encode() in ranks
    ranks["中文a".encode()] = len(ranks)
    (out / "tiktoken.model").write_bytes(tiktoken_file_bytes(ranks))
    added = {str(len(ranks) + i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True} for i, token in enumerate(KIMI_SPECIAL)}
    config = {"added_tokens_decoder": added, "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]",
              "pad_token": "[UNK]", "model_max_length": 8192, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast",
              "chat_template": (FIXTURES / template).read_text(encoding="utf-8")}
    if module:
        shutil.copyfile(FIXTURES / "tokenization_kimi.py.txt", out / "tokenization_kimi.py")
        config.update(tokenizer_class="TikTokenTokenizer",
                      auto_map={"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]})
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


def with_deepseek_model(directory: Path, vocab_size: int, seed: int = 0, model_type: str = "deepseek_v3") -> Path:
    """Write a random tiny transformers model into `directory` (config.json and safetensors with one tensor per
    routed expert, as the releases store them): DeepSeek-V3-like (sigmoid routing with a bias, groups, q-LoRA) or,
    for `deepseek_v2`, DeepSeek-V2-Lite-like (softmax routing, no q-LoRA)."""
    from hf_dirs import V2_LITE_LIKE, V3_LIKE, save_directory, transformers_model

    shape = {"deepseek_v3": dict(V3_LIKE, num_nextn_predict_layers=0), "deepseek_v2": V2_LITE_LIKE}[model_type]
    model = transformers_model(model_type, seed, **{**shape, "vocab_size": vocab_size, "max_position_embeddings": 512})
    return save_directory(model, directory)
