# Aquila-7B pretraining on 8 devices, fp16 with dynamic loss scaling from 8192, AdamW 0.9/0.98, weight decay 0.1,
# activation checkpointing.
# Sources: FlagAI-Open/FlagAI examples/Aquila/deepspeed.json (fp16 dynamic loss scale, window 1000; Adam lr 1e-5,
# betas 0.9/0.98, eps 1e-6, weight decay 0.1; gradient clipping 1.0; activation checkpointing; WarmupLR), and
# Ascend/AscendSpeed examples/aquila/pretrain_aquila_7B.sh (8 NPUs, seq 2048, micro-batch 2, global 64, 1024
# iterations).
# The initial scale 2^13 = 8192 is the "loss_scale" of the FlagAI Aquila-7B document's deepspeed.json (DeepSpeed's
# default would be 2^16).
# Model: https://huggingface.co/BAAI/Aquila-7B (byte-level BPE tokenizer.json, vocab 100008, RMSNorm eps 1e-5).
#   python convert.py hf-to-native --src=hf/Aquila-7B --dst=checkpoints/aquila-7b        # for its tokenizer.json
#   python prepare.py --input='corpus/*.txt' --tokenizer=checkpoints/aquila-7b --out=data/aquila_7b_pretrain \
#       --workers=16
#   torchrun --nproc_per_node=8 train.py config/aquila_7b_pretrain.py
#   python train.py config/aquila_7b_pretrain.py --dry_run
out_dir = "out/aquila_7b_pretrain"
data_dir = "data/aquila_7b_pretrain"
model = "aquila-7b"
devices = 8
dp, tp = 8, 1  # ZeRO-2 in both sources; FSDP2 here
activation_checkpointing = "full"
dtype = "float16"
loss_scale = 8192.0
loss_scale_window = 1000
seq_len = 2048
micro_batch_size = 2
global_batch_size = 64
max_iters = 1024
lr = 1e-5
min_lr = 1e-5  # WarmupLR: warm up, then constant
warmup_iters = 10  # 1% (AscendSpeed's --lr-warmup-fraction .01; FlagAI's 2000 warmup steps exceed this run)
lr_decay_iters = 1024
weight_decay = 0.1
beta1, beta2 = 0.9, 0.98  # eps 1e-6 in the source; ours is torch's 1e-8
grad_clip = 1.0
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000
export = True
