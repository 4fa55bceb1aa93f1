# The main job: a small LLaMA-style model on data/default (python prepare.py), ~8 minutes on 2 CPU cores.
#   python train.py config/default.py && python sample.py --ckpt=out/default/export --prompt="def "
# Tuned for the best val loss in that time (sweeps of size, batch, seq_len, lr, weight decay at equal compute):
# with ~1M tokens to spend, a small model taking many small steps wins; the 8192-token output layer is most of it.
out_dir = "out/default"
data_dir = "data/default"
model = "tiny"  # then overridden: 2 layers, dim 128, 4 heads; vocab from meta.json (8192)
dim = 128
n_layers = 2
n_heads = 4
n_kv_heads = 4
hidden_dim = 352
max_seq_len = 256  # room for sample.py; training windows are seq_len
seq_len = 64
micro_batch_size = 16
global_batch_size = 16
max_iters = 900
lr = 4e-3
min_lr = 4e-4
warmup_iters = 40
lr_decay_iters = 900
weight_decay = 0.1
beta2 = 0.99  # small batches: a longer second-moment average
eval_interval = 150
eval_iters = 20
log_interval = 50
ckpt_interval = 300
keep_last = 2  # one damaged step dir falls back to the one before
export = True
