"""
A LoRA checkpoint (an adapter dir: adapter_config.json + adapter_model.safetensors, as --lora_rank runs write them)
-> a plain Hugging Face checkpoint with the adapter merged into its base, W + (lora_alpha / r) B A, for anything that
does not read adapters:

    python merge_lora.py out/grpo/ckpt out/grpo_merged
    python merge_lora.py ADAPTER_DIR OUT_DIR --lora_base=/models/Qwen2.5-7B   # where the base has moved

The weights keep the base's stored dtype; the tokenizer files come from the adapter dir (or, without them, the base).
"""
import argparse

from lora import tokenizer_dir
from model import Transformer
from train_common import copy_tokenizer_files


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter_dir")
    p.add_argument("out_dir")
    p.add_argument("--lora_base", default="", help="the base checkpoint, where the adapter's config names none here")
    a = p.parse_args(argv)
    model = Transformer.from_pretrained(a.adapter_dir, lora_base=a.lora_base or None)
    model.save_pretrained(a.out_dir)
    copy_tokenizer_files(tokenizer_dir(a.adapter_dir, a.lora_base), a.out_dir)
    print(f"merged {a.adapter_dir} into its base: {a.out_dir}")


if __name__ == "__main__":
    main()
