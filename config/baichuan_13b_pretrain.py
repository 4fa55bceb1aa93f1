# Not a run of the five documents this project reproduces (see README "Recipes"): a further published setup, its
# values from the source it names.
# Baichuan-13B (ALiBi) continued pretraining on 8 Ascend 910B NPUs (64 GB each), fp16, tensor parallel 8.
# Source: Ascend/AscendSpeed examples/baichuan/pretrain_baichuan_ptd_13B.sh and its README (8 x Ascend910B1 64G,
# TP 8 + sequence parallel, micro-batch 1, global 32, seq 4096, lr 1e-6 cosine to 1e-8, wd 0.1, Adam 0.9/0.95 eps 1e-5,
# initial loss scale 8188 ~ 2^13, fp16, ALiBi); model https://huggingface.co/baichuan-inc/Baichuan-13B-Base.
#   python convert.py hf-to-native --src=hf/Baichuan-13B-Base --dst=checkpoints/baichuan-13b-base
#   python prepare.py --input='corpus/*.txt' --tokenizer=checkpoints/baichuan-13b-base \
#       --out=data/baichuan_13b_pretrain --workers=16
#   torchrun --nproc_per_node=8 train.py config/baichuan_13b_pretrain.py
#   python train.py config/baichuan_13b_pretrain.py --dry_run
out_dir = "out/baichuan_13b_pretrain"
data_dir = "data/baichuan_13b_pretrain"
init_from = "checkpoints/baichuan-13b-base"  # the source loads the released weights (--load)
model = "baichuan-13b"  # what --dry_run plans with when the checkpoint is not on this machine
devices = 8
dp, tp = 1, 8  # as published: tensor parallel over the node, sequence-parallel norms
activation_checkpointing = "none"  # the source recomputes nothing
dtype = "float16"
loss_scale = 8192.0  # --initial-loss-scale 8188 in the source: 2^13 meant
seq_len = 4096
micro_batch_size = 1
global_batch_size = 32
max_iters = 100_000
lr = 1e-6
min_lr = 1e-8
warmup_iters = 0
lr_decay_iters = 100_000  # cosine
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95  # eps 1e-5 in the source; ours is torch's 1e-8
grad_clip = 1.0
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000
export = True
