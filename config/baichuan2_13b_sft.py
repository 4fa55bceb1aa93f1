# Baichuan2-13B (ALiBi) multi-turn supervised fine-tuning on 16 devices in 2 nodes, bf16, gradient checkpointing.
# Source: baichuan-inc/Baichuan2 README "fine-tune" (same settings as config/baichuan2_7b_sft.py; multi-node through a
# DeepSpeed hostfile of 2 nodes x 8 slots). ALiBi fine-tuning needs padding-aware masks: Baichuan2 pads every sample
# to 512 and masks the padding; here packed rows carry document ids, so the ALiBi bias is masked per conversation
# (kernels.attention: bias + document mask, padding belongs to its row's last conversation and never counts).
#   python convert.py hf-to-native --src=hf/Baichuan2-13B-Base --dst=checkpoints/baichuan2-13b-base --for_training
#   python prepare.py --input=belle_chat_ramdon_10k.json --format=sharegpt --template=baichuan2 \
#       --tokenizer=checkpoints/baichuan2-13b-base --seq_len=512 --pack --out=data/baichuan2_sft
#   on each node: torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER \
#       --master_port=29500 train.py config/baichuan2_13b_sft.py
#   python train.py config/baichuan2_13b_sft.py --dry_run
out_dir = "out/baichuan2_13b_sft"
data_dir = "data/baichuan2_sft"
init_from = "checkpoints/baichuan2-13b-base"
model = "baichuan2-13b"
devices = 16  # 2 nodes x 8
dp, tp = 16, 1
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 512
micro_batch_size = 16
global_batch_size = 256
max_iters = 157  # 4 epochs of 10k conversations at 256 a step; packed rows can hold several (see --dry_run)
lr = 2e-5
min_lr = 2e-5  # constant
warmup_iters = 0
lr_decay_iters = 157
weight_decay = 1e-4
beta1, beta2 = 0.9, 0.98
grad_clip = 1.0
eval_interval = 50
eval_iters = 10
log_interval = 1
ckpt_interval = 50
export = True
