# Baichuan-7B pretraining on 8 Ascend NPUs (one node), fp16 with dynamic loss scaling, RoPE, 4096-token context.
# Source: Ascend/AscendSpeed examples/baichuan/pretrain_baichuan_zero_7B.sh (8 x Ascend NPUs, DeepSpeed ZeRO-2, fp16,
# block activation checkpointing) and the model card https://huggingface.co/baichuan-inc/Baichuan-7B (RoPE, 4096).
#   python convert.py hf-to-native --src=hf/Baichuan-7B --dst=checkpoints/baichuan-7b      # for its tokenizer
#   python prepare.py --input='corpus/*.txt' --tokenizer=checkpoints/baichuan-7b --out=data/baichuan_7b_pretrain \
#       --workers=16
#   torchrun --nproc_per_node=8 train.py config/baichuan_7b_pretrain.py
#   python train.py config/baichuan_7b_pretrain.py --dry_run           # memory and time per device, nothing allocated
out_dir = "out/baichuan_7b_pretrain"
data_dir = "data/baichuan_7b_pretrain"
model = "baichuan-7b"
devices = 8  # 1 node x 8 NPUs
dp, tp = 8, 1  # ZeRO-2 in the source; FSDP2 here shards parameters too
activation_checkpointing = "full"  # the source recomputes 30 of 32 blocks (--checkpoint-policy block)
dtype = "float16"
loss_scale = 256.0  # DeepSpeed "initial_scale_power": 8, dynamic ("loss_scale": 0)
loss_scale_window = 1000
seq_len = 4096
micro_batch_size = 1
global_batch_size = 8
max_iters = 1024
lr = 1e-5
min_lr = 1e-6
warmup_iters = 102  # --lr-warmup-fraction .1
lr_decay_iters = 1024  # cosine
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95  # eps 1e-8 (torch's default)
grad_clip = 1.0
eval_interval = 1000
eval_iters = 1
log_interval = 1
ckpt_interval = 1000
export = True
