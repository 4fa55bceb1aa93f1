# Vicuna-7B: LLaMA-7B fine-tuned on ShareGPT conversations (multi-turn, loss on the assistant turns) on 4 x A100 40GB,
# bf16, FSDP, gradient checkpointing. Source: lm-sys/FastChat README "Fine-tuning Vicuna-7B with Local GPUs"
# (torchrun --nproc_per_node=4 fastchat/train/train_mem.py --bf16 True --num_train_epochs 3
# --per_device_train_batch_size 2 --gradient_accumulation_steps 16 --learning_rate 2e-5 --weight_decay 0.
# --warmup_ratio 0.03 --lr_scheduler_type cosine --fsdp "full_shard auto_wrap" --model_max_length 2048
# --gradient_checkpointing True) and its hyperparameter table (batch 128, lr 2e-5, 3 epochs, max length 2048, wd 0);
# ~70K ShareGPT conversations (Vicuna blog, 2023-03-30); conversation template vicuna_v1.1.
#   python convert.py hf-to-native --src=hf/llama-7b --dst=checkpoints/llama-7b
#   python prepare.py --input=sharegpt_clean_split.json --format=sharegpt --template=vicuna \
#       --tokenizer=checkpoints/llama-7b --seq_len=2048 --pack --out=data/sharegpt_llama
#   torchrun --nproc_per_node=4 train.py config/vicuna_7b.py
#   python train.py config/vicuna_7b.py --dry_run
out_dir = "out/vicuna_7b"
data_dir = "data/sharegpt_llama"
init_from = "checkpoints/llama-7b"
model = "llama-7b"
devices = 4
dp, tp = 4, 1
device_memory_gib = 40.0  # A100 40GB
peak_flops = 312e12  # A100 dense bf16
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 2048
micro_batch_size = 2
global_batch_size = 128
max_iters = 1641  # 3 epochs of ~70K conversations at 128 a step; packed rows can hold several (see --dry_run)
lr = 2e-5
min_lr = 0.0
warmup_iters = 49  # 3%
lr_decay_iters = 1641  # cosine
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999  # Hugging Face Trainer's AdamW defaults
grad_clip = 1.0
eval_interval = 200
eval_iters = 10
log_interval = 1
ckpt_interval = 400
export = True
