"""Defaults shared by every named config; each file in configs/ starts from `base_config()`.

Every field that exists here can be overridden on the command line as `--config.<group>.<key>=<value>`.
The README's config reference documents each one.
"""

import ml_collections

from parallel.rules import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 4  # == num_heads: MHA; 1: MQA; in between: GQA
  c.model.head_dim = 0  # 0: d_model // num_heads
  c.model.mlp_dim = 1024
  c.model.mlp_type = "swiglu"  # swiglu | gelu
  c.model.norm_type = "rmsnorm"  # rmsnorm | layernorm
  c.model.norm_eps = 1e-6
  c.model.position_type = "rope"  # rope | learned | sinusoidal
  c.model.rope_theta = 10_000.0
  c.model.rope_scaling_type = ""  # "" (none) | linear | llama3: RoPE frequencies stretched for long contexts
  c.model.rope_scaling_factor = 1.0  # linear and llama3: how much longer the context gets
  c.model.rope_low_freq_factor = 1.0  # llama3 only
  c.model.rope_high_freq_factor = 4.0  # llama3 only
  c.model.rope_original_max_len = 8192  # llama3 only: the context length the model was pretrained at
  c.model.attention_bias = False  # biases on the q, k, v projections (Qwen2-style)
  c.model.attention_out_bias = False  # a bias on the attention output projection
  c.model.qk_norm = False  # RMSNorm over head_dim of q and k before RoPE (Qwen3)
  c.model.sliding_window = 0  # > 0: each query sees only keys less than this many positions behind (Mistral)
  c.model.tie_embeddings = True
  c.model.dropout_rate = 0.0
  c.model.init_std = 0.02
  c.model.vocab_multiple = 128  # embedding rows are padded to a multiple of this (and of the tensor axis)
  c.model.param_dtype = "float32"  # master weights; anything else needs allow_low_precision_params
  c.model.allow_low_precision_params = False  # True: you accept bf16 master weights (small updates round away)
  c.model.compute_dtype = "float32"  # float32 | bfloat16
  # What the backward pass keeps rather than recomputes: none (keep all) | full (= save_nothing) |
  # save_projections | save_all_but_attention | offload_projections (GPU/TPU: to host memory)
  c.model.remat = "none"
  # Layers per iteration of the layer scan. 1: the compiled program holds one layer whatever the depth. More
  # lets XLA fuse across layers and skip stacking each layer's activations (bench_peer bf16 on CPU: 1.14 ->
  # 1.00 s/step at 8, fp32 slower: 1.60 -> 1.69), and compile time grows with it.
  c.model.scan_unroll = 1
  c.model.attention = "auto"  # auto | xla | chunked | cudnn (GPU) | splash (TPU): the kernel behind model/attend.py
  c.model.loss_chunk = 0  # > 0: the loss holds fp32 logits for this many positions at a time; 0: all at once
  c.model.attention_block = 512  # keys per block of the chunked attention (memory O(seq_len x block))

  c.moe = ml_collections.ConfigDict()
  c.moe.num_experts = 0  # 0: dense model
  c.moe.top_k = 2
  c.moe.capacity_factor = 1.25  # <= 0: dropless
  c.moe.group_size = 512  # capacity path: tokens per routing group (each group of a sequence has its own capacity)
  # Dropless token exchange between expert-parallel devices: auto (ragged on GPU/TPU, buffer on CPU) |
  # ragged (jax.lax.ragged_all_to_all, GPU/TPU only) | buffer (fixed worst-case buffers, any backend)
  c.moe.dropless_impl = "auto"
  c.moe.every = 1  # an MoE MLP every N layers, dense MLPs between
  c.moe.num_shared_experts = 0
  c.moe.expert_mlp_dim = 0  # 0: model.mlp_dim
  c.moe.router_score = "softmax"  # softmax | sigmoid
  c.moe.renormalize_gates = True
  c.moe.aux_loss_weight = 0.01
  c.moe.z_loss_weight = 0.001

  c.data = ml_collections.ConfigDict()
  c.data.files = ""  # comma-separated globs; empty: the Python standard library's source tree
  c.data.text_field = "text"  # JSONL field / Parquet column holding the document text
  c.data.hf_dataset = ""  # optional: a Hugging Face dataset name (needs network and `datasets`)
  c.data.hf_split = "train"
  c.data.invalid_utf8 = "replace"  # replace | skip: what to do with a file that is not valid UTF-8
  c.data.tokenizer = ""  # path to a sentencepiece .model; empty: train one on the corpus
  c.data.tokenizer_type = "bpe"  # bpe | unigram (only when training one)
  c.data.vocab_size = 4096  # size of the tokenizer to train (ignored when data.tokenizer is given)
  c.data.tokenizer_sample_bytes = 5_000_000
  c.data.seq_len = 256
  c.data.eval_fraction = 0.01  # fraction of documents held out, chosen by a hash of their key
  c.data.num_workers = 2  # processes that tokenize
  c.data.cache_dir = ""  # empty: $XDG_CACHE_HOME/kiln or ~/.cache/kiln
  c.data.shuffle = True
  c.data.unit_bytes = 16 << 20  # corpus bytes per tokenization work unit: who tokenizes what, never the data order
  # sft / dpo data: chatml | llama3 | plain, or a turn format with {content} (and {role}), see data/chat.py
  c.data.chat_template = "chatml"

  c.optim = ml_collections.ConfigDict()
  c.optim.peak_lr = 3e-4
  c.optim.final_lr = 3e-5
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1  # applied to matrices only (embeddings included), never to norms or biases
  c.optim.clip_norm = 1.0  # global-norm clipping; <= 0 disables
  c.optim.zero_stage = 0  # 0 | 1 | 2: optimizer state (1) and gradients (2) sharded over `data`

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.global_batch_size = 16  # sequences per optimizer update, all processes together
  c.train.grad_accum = 1  # microbatches per update; global_batch_size must divide evenly
  c.train.z_loss_weight = 0.0  # weight of log(Z)^2 of the output softmax
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.seed = 0
  c.train.objective = "lm"  # lm | sft (chat JSONL) | dpo (preference JSONL) | distill (from config.distill.teacher)
  c.train.compilation_cache = True  # JAX's persistent compilation cache under <data cache dir>/jax
  c.train.profile_steps = 0  # > 0: trace this many steps (after the first two) into <workdir>/tb for TensorBoard

  c.mesh = ml_collections.ConfigDict()
  for axis in ("stage", "data", "fsdp", "expert", "tensor"):
    setattr(c.mesh, axis, -1 if axis == "data" else 1)
    setattr(c.mesh, f"dcn_{axis}", 1)  # multi-slice: this axis's size across slices (over DCN)
  # Logical axis name -> comma-separated mesh axes ("" = replicated); see sharding/rules.py.
  c.mesh.rules = ml_collections.ConfigDict(DEFAULT_RULES)

  c.pipeline = ml_collections.ConfigDict()  # used only when mesh.stage (x dcn_stage) > 1
  c.pipeline.schedule = "1f1b"  # gpipe | circular | 1f1b
  c.pipeline.microbatches = 4  # per grad_accum microbatch; at least mesh.stage
  c.pipeline.repeats = 1  # circular only (> 1): layer chunks per stage

  # LoRA fine-tuning (rank 0: off, full fine-tuning): only the adapters train, the base (checkpoint.init_from,
  # else the seed's random init) stays frozen and out of the optimizer and the checkpoints.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0  # the adapter's output is scaled by alpha / rank
  c.lora.dropout = 0.0  # on the adapter's input, training only
  c.lora.targets = "q,v"  # comma-separated among q, k, v, o, gate, up, down (MoE models: attention only)

  c.dpo = ml_collections.ConfigDict()  # train.objective=dpo
  c.dpo.beta = 0.1  # strength of the implicit KL to the reference: larger keeps the policy closer to it
  c.dpo.reference = ""  # the frozen reference run/checkpoint; empty: checkpoint.init_from, else this run's init

  c.distill = ml_collections.ConfigDict()  # train.objective=distill
  c.distill.teacher = ""  # a run directory (or checkpoint) of any size trained with the same tokenizer
  c.distill.temperature = 2.0  # softens both distributions; the KL term is scaled by temperature^2
  c.distill.alpha = 0.5  # weight of the KL to the teacher; 1 - alpha: the usual next-token loss

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 3
  c.checkpoint.keep_period = 0  # > 0: checkpoints at multiples of this step are never deleted
  c.checkpoint.init_from = ""  # a run directory or checkpoint to start a new run from
  c.checkpoint.init_optimizer_state = False
  c.checkpoint.async_save = True
  return c
