# Not a run of the five documents this project reproduces (see README "Recipes"): a further published setup, its
# values from the source it names.
# LLaMA-7B supervised fine-tuning on the Alpaca data (52K instructions) on 4 x A100 80GB, bf16, FSDP, gradient
# checkpointing. Source: tatsu-lab/stanford_alpaca README (torchrun --nproc_per_node=4 train.py --bf16 True
# --num_train_epochs 3 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --learning_rate 2e-5
# --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --fsdp "full_shard auto_wrap"; batch 128, max
# length 512; its PROMPT_DICT is prepare.py's 'alpaca' template; loss on the responses only).
#   python convert.py hf-to-native --src=hf/llama-7b --dst=checkpoints/llama-7b
#   python prepare.py --input=alpaca_data.json --format=alpaca --template=alpaca --tokenizer=checkpoints/llama-7b \
#       --seq_len=512 --pack --out=data/alpaca_llama
#   torchrun --nproc_per_node=4 train.py config/llama_7b_alpaca.py
#   python train.py config/llama_7b_alpaca.py --dry_run
out_dir = "out/llama_7b_alpaca"
data_dir = "data/alpaca_llama"
init_from = "checkpoints/llama-7b"
model = "llama-7b"
devices = 4
dp, tp = 4, 1
device_memory_gib = 80.0  # A100 80GB
peak_flops = 312e12  # A100 dense bf16
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 512
micro_batch_size = 4
global_batch_size = 128
max_iters = 1219  # 3 epochs of 52,002 examples at 128 a step; packed rows hold several (see --dry_run)
lr = 2e-5
min_lr = 0.0
warmup_iters = 37  # 3%
lr_decay_iters = 1219  # cosine
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999  # Hugging Face Trainer's AdamW defaults
grad_clip = 1.0
eval_interval = 200
eval_iters = 10
log_interval = 1
ckpt_interval = 400
export = True
