# Baichuan2-13B (ALiBi, NormHead) continued pretraining on 16 devices in 2 nodes (2 x 8 Ascend NPUs), bf16.
# Source: Ascend/AscendSpeed examples/baichuan2/pretrain_baichuan2_ptd_13B.sh (NNODES=2 x 8 NPUs, TP 8 + sequence
# parallel, distributed optimizer, micro-batch 2, global 256, seq 4096, 1000 iterations, lr 2e-5 constant, wd 1e-4,
# Adam 0.9/0.98 eps 1e-8, clip 1.0, ALiBi, --lm-norm-weight, bf16, recomputation under a 56 GB budget); the Baichuan 2
# technical report (arXiv:2309.10305) for NormHead and the max-z loss (2e-4; the AscendSpeed script sets it to 0).
#   python convert.py hf-to-native --src=hf/Baichuan2-13B-Base --dst=checkpoints/baichuan2-13b-base --for_training
#   python prepare.py --input='corpus/*.txt' --tokenizer=checkpoints/baichuan2-13b-base \
#       --out=data/baichuan2_13b_pretrain --workers=16
#   on each node (node_rank 0 and 1):
#   torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER --master_port=29500 \
#       train.py config/baichuan2_13b_pretrain.py
#   python train.py config/baichuan2_13b_pretrain.py --dry_run
out_dir = "out/baichuan2_13b_pretrain"
data_dir = "data/baichuan2_13b_pretrain"
init_from = "checkpoints/baichuan2-13b-base"
model = "baichuan2-13b"
z_loss = 2e-4
devices = 16  # 2 nodes x 8
dp, tp = 2, 8  # as published: TP within a node, data parallel (FSDP2) across the two
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 4096
micro_batch_size = 2
global_batch_size = 256
max_iters = 1000
lr = 2e-5
min_lr = 2e-5  # constant schedule
warmup_iters = 0
lr_decay_iters = 1000
weight_decay = 1e-4
beta1, beta2 = 0.9, 0.98
grad_clip = 1.0
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000
export = True
