r"""The conversion check: a Hugging Face model in, imitax out, and back, exactly.

(The README's main command is the demo sweep, ``scripts/sweep.py --config=configs/demo.py``;
this script is the smaller check of the conversion path that the README describes after it.)

It builds a small LLaMA-style model on the spot (random weights, a BPE tokenizer
trained here on a few sentences), saves it as a Hugging Face directory, converts
it with ``scripts/convert.py``, generates text with imitax, exports it back to
Hugging Face format and checks that transformers reproduces the same logits and
the same greedy continuation. Nothing is downloaded.

  python scripts/demo.py --workdir=out/convert_demo
"""

import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("workdir", "out/convert_demo", "Where the model directories go (replaced on each run).")
flags.DEFINE_integer("max_new_tokens", 24, "Tokens to generate per prompt.")
FLAGS = flags.FLAGS

CORPUS = [
    "The student model imitates the teacher's answers.",
    "Imitation copies the style of an answer, not the knowledge behind it.",
    "A larger base model knows more facts before any finetuning begins.",
    "We measure what the student gained with benchmarks, not with impressions.",
    "Every converted checkpoint must give the same logits as the reference model.",
]
PROMPTS = ["The student model", "Imitation copies the", "A larger base model"]


def build_hf_model(hf_dir: str) -> None:
    """A random LLaMA-style model and a locally trained tokenizer, saved in HF format."""
    import tokenizers
    import torch
    import transformers

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    # Wider than the default init so that the random model's predictions are not all ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)


def run_convert(*args: str) -> None:
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "convert.py"), *args]
    print("$", " ".join(["python", "scripts/convert.py", *args]))
    subprocess.run(cmd, check=True)


def main(argv):
    del argv
    import numpy as np
    import torch
    import transformers

    from imitax import convert
    from imitax.eval.generate import generate

    work = os.path.abspath(FLAGS.workdir)
    hf_dir, ckpt, export_dir = (os.path.join(work, d) for d in ("hf", "imitax_ckpt", "exported_hf"))
    start = time.time()

    print(f"1. Building a small LLaMA-style Hugging Face model in {hf_dir}")
    os.makedirs(work, exist_ok=True)
    build_hf_model(hf_dir)

    print("2. Converting it to an imitax checkpoint")
    run_convert(f"--hf_dir={hf_dir}", f"--out={ckpt}", "--overwrite")

    print("3. Generating with imitax (greedy, KV cache)")
    model = convert.load_checkpoint(ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(convert.tokenizer_dir(ckpt)))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outputs = generate(model, prompts, max_new_tokens=FLAGS.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        print(f"   {prompt!r} -> {tokenizer.decode(out)!r}")

    print(f"4. Exporting back to Hugging Face format in {export_dir}")
    run_convert("--export", f"--ckpt={ckpt}", f"--out={export_dir}", "--overwrite")

    print("5. Checking the export against transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
    ids = prompts[0]
    with torch.no_grad():
        ref_logits = hf_model(torch.tensor([ids])).logits.numpy()
        ref_out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=FLAGS.max_new_tokens, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
    logits = np.asarray(model(np.asarray([ids])))
    diff = float(np.abs(logits - ref_logits).max())
    same = ref_out[: len(outputs[0])] == outputs[0]
    print(f"   max |logit difference| imitax vs transformers: {diff:.2e}")
    print(f"   greedy continuation identical to transformers' generate: {same}")
    print(f"Done in {time.time() - start:.0f}s.")
    if diff > 1e-4 or not same:
        sys.exit("imitax and transformers disagree: this is a bug, please report it")


if __name__ == "__main__":
    app.run(main)
