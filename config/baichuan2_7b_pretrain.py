# Baichuan2-7B continued pretraining on 8 devices (one node of Ascend NPUs), bf16, NormHead, max-z loss.
# Source: Ascend/AscendSpeed examples/baichuan2/pretrain_baichuan2_ptd_7B.sh (8 NPUs, TP 8 + sequence parallel,
# micro-batch 4, global 128, seq 4096, lr 1e-6 cosine to 1e-8, wd 0.01, Adam 0.9/0.95, clip 1.0, bf16, --lm-norm-weight)
# and the Baichuan 2 technical report (arXiv:2309.10305, section 2.6: NormHead; max-z loss with coefficient 2e-4).
#   python convert.py hf-to-native --src=hf/Baichuan2-7B-Base --dst=checkpoints/baichuan2-7b-base --for_training
#   python prepare.py --input='corpus/*.txt' --tokenizer=checkpoints/baichuan2-7b-base \
#       --out=data/baichuan2_7b_pretrain --workers=16
#   torchrun --nproc_per_node=8 train.py config/baichuan2_7b_pretrain.py
#   python train.py config/baichuan2_7b_pretrain.py --dry_run
out_dir = "out/baichuan2_7b_pretrain"
data_dir = "data/baichuan2_7b_pretrain"
init_from = "checkpoints/baichuan2-7b-base"  # raw NormHead rows (--for_training): normalised in every forward
model = "baichuan2-7b"
z_loss = 2e-4  # the report's max-z loss (released configs say 0: it only matters in training)
devices = 8
dp, tp = 1, 8  # as published
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 4096
micro_batch_size = 4
global_batch_size = 128
max_iters = 100_000
lr = 1e-6
min_lr = 1e-8
warmup_iters = 0
lr_decay_iters = 100_000  # cosine
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000
export = True
