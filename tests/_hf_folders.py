"""Small random-init Hugging Face folders, built and ``save_pretrained`` by the tests themselves (offline).

``save_folder(config, path)`` writes what a user's fine-tuned model folder holds: ``config.json``,
``model.safetensors``, ``generation_config.json``, and (by default) a real byte-level BPE tokenizer
trained here on a few sentences, with bos/eos and a ChatML chat template (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``). Configs keep head sizes at multiples of 16 (what ONNX
Runtime's CPU ``GroupQueryAttention`` kernel is built for) and vocabularies at :data:`VOCAB`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

#: model vocabulary of every test folder; the tokenizer uses the first ids of it
VOCAB = 320

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "The working memory of a language model is its cache.",
    "Streams at different positions step together in one call.",
    "hello world, hello streaming runtime! café, naïve, 東京 and emoji 🙂",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: ; , . ? ( ) [ ] { }",
] * 20


def build_tokenizer(vocab_size: int = 300) -> Any:
    """A byte-level BPE tokenizer (every UTF-8 string encodes), wrapped as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def tiny_qwen3(max_position_embeddings: int = 512) -> Any:
    """A 2-layer Qwen3 config (hidden 64, 4 query / 2 KV heads of 16): the text and serving tests' model."""
    from transformers import Qwen3Config  # noqa: PLC0415

    return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=max_position_embeddings)


def corpus_ids(tok: Any) -> tuple[Any, Any]:
    """The shipped corpus' training and held-out splits (``wmdeploy.models.tasks``), encoded with ``tok``."""
    import numpy as np  # noqa: PLC0415

    from wmdeploy.models import tasks  # noqa: PLC0415

    return tuple(np.array(tok(part.astype(np.uint8).tobytes().decode("utf-8", "ignore"),
                              add_special_tokens=False).input_ids) for part in tasks.text_splits())


def train_corpus_lm(path: Path, steps: int, window: int = 64, **config: Any) -> Path:
    """A Qwen3-shaped LM (``config``: its sizes) trained ``steps`` AdamW steps on ``window``-token pieces of the
    corpus' training split with :func:`build_tokenizer`'s vocabulary, saved as a user's folder."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.manual_seed(0)
    tok = build_tokenizer()
    ids, _ = corpus_ids(tok)
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / (steps + 1))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - window - 1, 16)
        x = torch.tensor(np.stack([ids[s:s + window + 1] for s in starts]))
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval().save_pretrained(str(path))
    tok.save_pretrained(str(path))
    transformers.GenerationConfig(eos_token_id=2, bos_token_id=0).save_pretrained(str(path))
    return path


def save_folder(config: Any, path: Path, *, tokenizer: bool = True, seed: int = 0) -> Path:
    """Build a random-init causal LM from ``config`` (float32), save it and a tokenizer into ``path``."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: PLC0415

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # random init with std 0.02 gives near-uniform logits; a wider spread makes greedy decoding meaningful
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(3.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    if tokenizer:
        tok = build_tokenizer()
        tok.save_pretrained(str(path))
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        bos = tok.convert_tokens_to_ids("<|endoftext|>")
        GenerationConfig(eos_token_id=eos, bos_token_id=bos, pad_token_id=bos).save_pretrained(str(path))
    return path
