"""support/convert_cli.py: convert.py's command line. Used by convert.py (its main); what it adds: the subcommands
and their flags, and the flags and the paths they name checked before anything is read (inputs that exist, an output
that is never an input nor inside one, ranges), each problem one CheckpointError that main says in one line.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional

from model import FAMILIES, CheckpointError, ModelArgs
from support.checks import check_value
from support.outputs import check_output
from support.weights import parse_size


def fail(msg):
    raise CheckpointError(msg)


def parse_args(argv, description: str, dtypes, default_shard: str) -> argparse.Namespace:
    """convert.py's subcommands and their flags, parsed (argparse exits with its usage on a flag it cannot parse)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dst", required=True, help="output dir (refused if it exists, unless --overwrite)")
    common.add_argument("--dtype", choices=dtypes, default=None, help="output dtype (default: as stored)")
    common.add_argument("--max_shard_size", default=default_shard, help="output shard size (default %(default)s)")
    common.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    template = argparse.ArgumentParser(add_help=False)
    template.add_argument("--template", default=None, help="chat template name for tokenizer_config.json "
                                                           "(default: the model's own Jinja chat_template, else the "
                                                           "family's; e.g. vicuna)")

    s = sub.add_parser("hf-to-native", parents=[common, template], help="Hugging Face dir -> checkpoint dir")
    s.add_argument("--src", required=True, help="HF dir: config.json + safetensors or .bin (sharded or not)")
    s.add_argument("--family", choices=list(FAMILIES), default=None, help="override the family read from config.json")
    s.add_argument("--for_training", action="store_true", help=argparse.SUPPRESS)  # older recipes': does nothing
    s = sub.add_parser("native-to-hf", parents=[common], help="checkpoint dir -> Hugging Face dir")
    s.add_argument("--src", required=True, help="checkpoint dir")
    s = sub.add_parser("meta-to-native", parents=[common, template], help="Meta consolidated.XX.pth -> checkpoint dir")
    s.add_argument("--src", required=True, help="dir with params.json and consolidated.XX.pth")
    s.add_argument("--max_seq_len", type=int, default=2048, help="context length (params.json does not say)")
    s = sub.add_parser("apply-delta", parents=[common, template], help="base + Vicuna-style delta -> checkpoint dir")
    s.add_argument("--src", required=True, help="base weights (HF dir or checkpoint dir)")
    s.add_argument("--delta", required=True, help="delta weights (HF dir or checkpoint dir)")
    s = sub.add_parser("dcp-to-native", parents=[common], help="train.py step dir -> checkpoint dir")
    s.add_argument("--src", required=True, help="out_dir/step_XXXXXXXX")
    s = sub.add_parser("gguf-to-native", parents=[common], help="GGUF file (llama, baichuan) -> checkpoint dir")
    s.add_argument("--src", required=True, help="a .gguf file")
    s = sub.add_parser("native-to-gguf", help="checkpoint dir -> GGUF file (llama.cpp, ollama)")
    s.add_argument("--src", required=True, help="checkpoint dir")
    s.add_argument("--dst", required=True, help="the .gguf file to write (refused if it exists, unless --overwrite)")
    s.add_argument("--type", choices=("f32", "f16", "q8_0", "q4_0"), default="f16",
                   help="weight type (default %(default)s, as llama.cpp's converter); norms stay f32, and q4_0 "
                        "keeps the output layer at q8_0")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    s = sub.add_parser("merge-lora", parents=[common], help="base checkpoint dir + LoRA adapter dir -> checkpoint dir")
    s.add_argument("--src", required=True, help="the base checkpoint dir the adapters were trained on")
    s.add_argument("--adapter", required=True, help="LoRA adapter dir: PEFT's (adapter_config.json + "
                   "adapter_model.safetensors or .bin; train.py writes it) or our older adapter.safetensors")
    s = sub.add_parser("ascendspeed-to-native", parents=[common],
                       help="AscendSpeed (Megatron) checkpoint, any tp/pp -> checkpoint dir")
    s.add_argument("--src", required=True, help="AscendSpeed --save/--load dir, or its release/ or iter_XXXXXXX/")
    s.add_argument("--like", help="checkpoint dir giving the architecture (config.json) and tokenizer (default: the "
                                  "config.json native-to-ascendspeed left in --src)")
    s = sub.add_parser("native-to-ascendspeed", parents=[common],
                       help="checkpoint dir -> AscendSpeed release checkpoint (its converter's layout)")
    s.add_argument("--src", required=True, help="checkpoint dir")
    s.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size of the AscendSpeed run")
    s.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size of the AscendSpeed run")
    s.add_argument("--make_vocab_size_divisible_by", type=int, default=128, help="as the run's flag (default 128)")
    s.add_argument("--no_merge_mlp", action="store_true", help="gate_proj + dense_h_to_4h instead of mlp.proj (for "
                                                               "runs without --mlp-layer-fusion)")
    s.add_argument("--deepspeed", action="store_true", help="DeepSpeed's layout (latest, mp_rank_XX_model_states.pt), "
                                                            "for scripts run with --deepspeed")
    return p.parse_args(argv)


INPUTS = ("src", "delta", "adapter", "like")  # the flags that name what a command reads


def check_flags(a) -> Optional[int]:
    """The parsed flags and the paths they name, before anything is read (the output never an input, nor in one);
    returns --max_shard_size in bytes (None for native-to-gguf, which writes one file)."""
    if a.command == "gguf-to-native" and not Path(a.src).is_file():
        fail(f"--src={a.src}: not a file")
    for flag in INPUTS:
        if getattr(a, flag, None) and not Path(getattr(a, flag)).is_dir() and a.command != "gguf-to-native":
            fail(f"--{flag}={getattr(a, flag)}: not a directory")
    if a.command == "native-to-gguf":
        if Path(a.dst).is_dir():
            fail(f"--dst {a.dst}: a directory; name the .gguf file to write")
        if Path(a.src).resolve() in Path(a.dst).resolve().parents:
            fail(f"--dst {a.dst} lies inside the input {a.src}: the output would mix with it")
        return None
    max_shard_bytes = parse_size(a.max_shard_size)
    check_output(a.dst, [getattr(a, f) for f in INPUTS if getattr(a, f, None)], "--dst", CheckpointError)
    if a.command == "meta-to-native":
        field = ModelArgs.__dataclass_fields__["max_seq_len"]  # the range ModelArgs declares for it
        try:
            check_value("max_seq_len", a.max_seq_len, int, field.metadata["range"])
        except ValueError as e:
            fail(f"--{e}")
    if a.command == "hf-to-native" and a.for_training:
        print("convert.py: --for_training is no longer needed and does nothing: a Baichuan2 checkpoint always "
              "keeps its raw NormHead (norm_head=true)", file=sys.stderr)
    if a.command == "native-to-ascendspeed":
        for flag in ("tp", "pp", "make_vocab_size_divisible_by"):
            if getattr(a, flag) < 1:
                fail(f"--{flag}={getattr(a, flag)}: expected a positive integer")
    return max_shard_bytes
