# Not a run of the five documents this project reproduces (see README "Recipes"): a further published setup, its
# values from the source it names.
# Baichuan2-7B multi-turn supervised fine-tuning on 8 devices (one node), bf16, gradient checkpointing.
# Source: baichuan-inc/Baichuan2 README "fine-tune" (deepspeed fine-tune/fine-tune.py on
# data/belle_chat_ramdon_10k.json: model_max_length 512, 4 epochs, 16 per device, lr 2e-5 constant, Adam 0.9/0.98
# eps 1e-8, wd 1e-4, clip 1.0, no warmup, gradient_checkpointing, bf16); loss only on the assistant turns, each
# sample padded to 512 with an attention mask. Here prepare.py --pack puts whole conversations in rows of 512 with
# document masks (attention never crosses a conversation or reaches padding; positions restart per conversation).
#   python convert.py hf-to-native --src=hf/Baichuan2-7B-Base --dst=checkpoints/baichuan2-7b-base --for_training
#   python prepare.py --input=belle_chat_ramdon_10k.json --format=sharegpt --template=baichuan2 \
#       --tokenizer=checkpoints/baichuan2-7b-base --seq_len=512 --pack --out=data/baichuan2_sft
#   torchrun --nproc_per_node=8 train.py config/baichuan2_7b_sft.py
#   python train.py config/baichuan2_7b_sft.py --dry_run
out_dir = "out/baichuan2_7b_sft"
data_dir = "data/baichuan2_sft"
init_from = "checkpoints/baichuan2-7b-base"
model = "baichuan2-7b"
devices = 8
dp, tp = 8, 1  # DeepSpeed ZeRO in the source; FSDP2 here
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 512
micro_batch_size = 16
global_batch_size = 128
max_iters = 313  # 4 epochs of 10k conversations at 128 a step; packed rows can hold several (see --dry_run)
lr = 2e-5
min_lr = 2e-5  # constant
warmup_iters = 0
lr_decay_iters = 313
weight_decay = 1e-4
beta1, beta2 = 0.9, 0.98
grad_clip = 1.0
eval_interval = 100
eval_iters = 10
log_interval = 1
ckpt_interval = 100
export = True
