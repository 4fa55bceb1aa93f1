# Baichuan-7B QLoRA supervised fine-tuning on one accelerator: NF4 base with double quantisation, bf16 compute, LoRA
# rank 8 / alpha 16 / dropout 0.05 on every linear layer but the output head (Baichuan's fused W_pack as one), the
# "Human: ...\n\nAssistant: ..." prompt, the loss on every token.
# Document: seed 003, section 1.1.3 "baichuan-7B的微调" (wp931120/baichuan_sft_lora, its sft_lora.py as listed: lines
# 40-185; lines 1-39 are illegible in the document). In "document says", plain text is the document's (the listing's
# line numbers in brackets); "HF Trainer:" the defaults of the Trainer the listing calls; "ours:" our reading.
#
# | value              | document says                          | we use                        | why different
# | base, quantisation | nf4, double quant, compute bfloat16;   | qlora (NF4, double quant),    |
# |                    | prepare_model_for_kbit_training        | bfloat16, full checkpointing  |
# |                    | [40-46]                                |                               |
# | LoRA               | r 8, alpha 16, dropout 0.05,           | lora_targets W_pack,wo,w1,w2, | one adapter on W_pack
# |                    | target_modules = find_all_linear_names:| w3: one adapter on the fused  | ([q; k; v]) as PEFT
# |                    | every Linear4bit but lm_head [51-75];  | q/k/v, 17,891,328 trainable   | puts it there; wq,wk,
# |                    | ours: on Baichuan-7B those are W_pack, | parameters                    | wv apart would be
# |                    | o_proj, gate_proj, up_proj, down_proj  |                               | 19,988,480
# | data               | BelleGroup train_0.5M_CN [1.1.3 text]  | the same (prep below)         |
# | prompt             | bos + "Human: " + instruction + input +| human-assistant template:     |
# |                    | "\n\nAssistant: " + output + eos       | the same text                 |
# |                    | [134-142]                              |                               |
# | loss               | labels = input_ids [129]               | --train_on_prompt             |
# | cut-off            | CUTOFF_LEN (its value illegible);      | 1024 (ours); a longer record  | the forced eos would
# |                    | truncation, then the last kept token   | is cut there plainly, no eos  | teach a reply to stop
# |                    | replaced by eos [106-126]              | put last                      | mid-sentence; few
# |                    |                                        |                               | Belle records pass it
# | batch              | per device 1, accumulation 4 [161-165] | micro 1, global 4             |
# | padding            | DataCollatorForSeq2Seq, one example a  | --one_per_row: one example a  | padded to 1024, not
# |                    | row, pad_to_multiple_of 8 [176-179]    | row (padding not counted)     | to a multiple of 8
# | epochs, lr         | 1 epoch, 3e-4 [161, 164]               | the same                      |
# | optimiser          | optim adamw_torch [174]; HF Trainer:   | the same; linear decay        |
# |                    | 0.9/0.999, eps 1e-8, wd 0, clip 1.0,   |                               |
# |                    | linear decay, no warmup                |                               |
# | validation         | VAL_SET_SIZE (illegible) [145-153]     | prepare.py's 2%               | ours: train.py needs
# |                    |                                        |                               | a val split
# | save               | save_steps 2000, save_total_limit 3    | ckpt_interval 2000, keep_last |
# |                    | [169-172]                              | 3                             |
# | memory             | 显存占用为7G左右 [after the listing]   | dry run below                 |
# | loss weighting     | HF Trainer: each micro batch's mean    | micro_batch: the same         |
# |                    | over its counted targets, then the     |                               |
# |                    | mean over micro batches and devices    |                               |
# |                    | (padding not counted)                  |                               |
#
# Our --dry_run (40% MFU of 313 TFLOP/s, one 64 GB device): 5.6 GiB, 0.94 s/step, 4,367 tokens/s; a padded row
# counts as 1024 tokens there. Measured on this repository's 2-core CPU (docs/training.md): 5.46 GiB peak
# RSS for one step at seq 512 (with adapters on wq, wk, wv apart then).
#
#   python convert.py hf-to-native --src=hf/baichuan-7B --dst=checkpoints/baichuan-7b
#   python prepare.py --input=Belle_open_source_0.5M.json --format=belle --template=human-assistant \
#       --train_on_prompt --tokenizer=checkpoints/baichuan-7b --seq_len=1024 --pack --one_per_row \
#       --out=data/belle_baichuan
#   python train.py config/baichuan_7b_qlora.py       # -> out/baichuan_7b_qlora/adapter and the merged export
#   python train.py config/baichuan_7b_qlora.py --dry_run
out_dir = "out/baichuan_7b_qlora"
data_dir = "data/belle_baichuan"
init_from = "checkpoints/baichuan-7b"
model = "baichuan-7b"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "W_pack,wo,w1,w2,w3"  # find_all_linear_names on Baichuan-7B: W_pack, o_proj, gate, up, down
qlora = True
devices = 1
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 1024
micro_batch_size = 1
global_batch_size = 4
loss_weighting = "micro_batch"  # the 2023 HF Trainer's, to reproduce the run: short examples weigh more
max_iters = 122_500  # 1 epoch: about 490K training examples at 4 a step (prepare.py prints the count)
lr = 3e-4
min_lr = 0.0
warmup_iters = 0
lr_decay = "linear"
lr_decay_iters = 122_500
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 2000
eval_iters = 20
log_interval = 10
ckpt_interval = 2000  # save_steps
keep_last = 3  # save_total_limit
export = True
