# What every *_tiny.py twin changes of its full recipe after exec'ing it, besides paths and model sizes: CPU scale.
# Not a recipe of its own (a leading underscore: train.py and the recipe tests pass it by).
devices, dp, tp = 1, 0, 1  # one process
micro_batch_size, global_batch_size = 2, 4
max_iters, warmup_iters, lr_decay_iters = 4, 1, 4
eval_interval, eval_iters, log_interval, ckpt_interval = 4, 1, 1, 4
peak_flops = 1e9  # no torch.mm measurement at start
