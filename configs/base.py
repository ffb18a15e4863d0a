"""Defaults shared by every named config; each file in configs/ starts from `base_config()`.

Every field that exists here can be overridden on the command line as `--config.<group>.<key>=<value>`.
docs/config.md is generated from this file (`python scripts/config_reference.py`): each key with its default and
the comment beside its assignment, or the comment lines directly above it. Every key needs one; the tests say
which lack it.
"""

import ml_collections

from parallel.rules import DEFAULT_RULES


def _model(c: ml_collections.ConfigDict) -> None:
  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4  # Transformer blocks, stacked on a `layers` axis and run under one scan
  c.model.d_model = 256  # residual stream width
  c.model.num_heads = 4  # query heads
  c.model.num_kv_heads = 4  # == num_heads: MHA; 1: MQA; in between: GQA (must divide num_heads)
  c.model.head_dim = 0  # 0: d_model // num_heads
  c.model.mlp_dim = 1024  # MLP hidden width
  c.model.mlp_type = "swiglu"  # swiglu | gelu
  c.model.norm_type = "rmsnorm"  # rmsnorm | layernorm
  c.model.norm_eps = 1e-6  # epsilon of every norm
  c.model.position_type = "rope"  # rope | learned | sinusoidal
  c.model.rope_theta = 10_000.0  # RoPE base
  # RoPE frequencies stretched for long contexts, as Hugging Face's `rope_parameters`: "" (none) | linear (every
  # frequency divided by rope_scaling_factor) | llama3 (Llama 3.1's banded rule)
  c.model.rope_scaling_type = ""
  c.model.rope_scaling_factor = 1.0  # linear and llama3: how much longer the context gets
  c.model.rope_low_freq_factor = 1.0  # llama3: wavelengths above rope_original_max_len / this are scaled fully
  # llama3: wavelengths below rope_original_max_len / this are kept; in between, interpolated
  c.model.rope_high_freq_factor = 4.0
  c.model.rope_original_max_len = 8192  # llama3 only: the context length the model was pretrained at
  c.model.attention_bias = False  # biases on the q, k, v projections (Qwen2-style)
  c.model.attention_out_bias = False  # a bias on the attention output projection
  c.model.qk_norm = False  # RMSNorm over head_dim of q and k before RoPE, one weight shared by the heads (Qwen3)
  # > 0: each query sees only keys less than this many positions behind (Mistral); 0: full causal attention
  c.model.sliding_window = 0
  c.model.tie_embeddings = True  # the LM head shares the embedding matrix
  c.model.dropout_rate = 0.0  # dropout on the embeddings and on each residual branch
  c.model.init_std = 0.02  # normal init; projections that write the residual use init_std / sqrt(2 * num_layers)
  c.model.vocab_multiple = 128  # embedding rows are padded to a multiple of this (and of the tensor axis)
  c.model.param_dtype = "float32"  # master weights; anything else needs allow_low_precision_params
  c.model.allow_low_precision_params = False  # True: you accept bf16 master weights (small updates round away)
  c.model.compute_dtype = "float32"  # float32 | bfloat16: activations and matmuls; logits and the loss stay fp32
  # int8 | fp8: the attention and MLP projections multiply quantized inputs and weights (qwix's quantized
  # training; fp8: e4m3 forward, e5m2 gradients); empty: in compute_dtype. How the step computes, not the weights
  c.model.quant = ""
  # What the backward pass keeps rather than recomputes: none (keep all) | full (= save_nothing) |
  # save_projections | save_all_but_attention | offload_projections (GPU/TPU: to host memory)
  c.model.remat = "none"
  # Layers per iteration of the layer scan (>= 1). 1: the compiled program holds one layer whatever the depth.
  # More lets XLA fuse across layers and skip stacking each layer's activations, but compile time grows with it
  # and whether the step gets faster depends on dtype and depth (docs/performance.md).
  c.model.scan_unroll = 1
  c.model.attention = "auto"  # auto | xla | chunked | cudnn (GPU) | splash (TPU): the kernel behind model/attend.py
  c.model.loss_chunk = 0  # > 0: the loss holds fp32 logits for this many positions at a time; 0: all at once
  c.model.attention_block = 512  # keys per block of the chunked attention (memory O(seq_len x block))
  # With mesh.context > 1, how attention reaches the keys on other devices (docs/parallelism.md): all_gather
  # (gather K and V, any local kernel but splash) | ring (K/V chunks passed round the devices, O(seq/context) memory)
  c.model.context_parallel = "all_gather"


def _moe(c: ml_collections.ConfigDict) -> None:
  c.moe = ml_collections.ConfigDict()
  c.moe.num_experts = 0  # experts per MoE layer; 0: dense model
  c.moe.top_k = 2  # experts per token
  c.moe.capacity_factor = 1.25  # > 0: capacity dispatch, assignments over an expert's capacity dropped; <= 0: dropless
  c.moe.group_size = 512  # capacity path: tokens per routing group (each group of a sequence has its own capacity)
  # Dropless token exchange between expert-parallel devices: auto (ragged on GPU/TPU, buffer on CPU) |
  # ragged (jax.lax.ragged_all_to_all, GPU/TPU only) | buffer (fixed worst-case buffers, any backend)
  c.moe.dropless_impl = "auto"
  c.moe.every = 1  # an MoE MLP every N layers (the last of each N), dense MLPs between
  c.moe.num_shared_experts = 0  # always-on experts added to every token's output
  c.moe.expert_mlp_dim = 0  # 0: model.mlp_dim
  c.moe.router_score = "softmax"  # softmax | sigmoid (the router runs in fp32)
  c.moe.renormalize_gates = True  # the top_k gates renormalised to sum to 1
  c.moe.aux_loss_weight = 0.01  # weight of the Switch load-balancing loss (moe_aux_loss)
  c.moe.z_loss_weight = 0.001  # weight of the router z-loss (moe_z_loss)


def _data(c: ml_collections.ConfigDict) -> None:
  c.data = ml_collections.ConfigDict()
  # comma-separated globs, local or URLs; empty: the Python standard library's source tree. WEIGHT:GLOB items
  # make a weighted mixture, one source per item ("0.7:web/*.parquet,0.3:code/*.jsonl"; docs/data.md)
  c.data.files = ""
  c.data.text_field = "text"  # JSONL field / Parquet column holding the document text
  c.data.hf_dataset = ""  # optional: a Hugging Face dataset name (needs network and `datasets`)
  c.data.hf_split = "train"  # the split of data.hf_dataset
  c.data.invalid_utf8 = "replace"  # replace | skip: what to do with a file that is not valid UTF-8
  # A sentencepiece .model or a Hugging Face tokenizer.json (a path or a URL); empty: train one on the corpus
  c.data.tokenizer = ""
  c.data.tokenizer_type = "bpe"  # bpe | unigram (only when training one)
  # Size of the tokenizer to train, and the vocabulary --dry_run plans with (a given data.tokenizer has its own)
  c.data.vocab_size = 4096
  c.data.tokenizer_sample_bytes = 5_000_000  # training text sampled to train the tokenizer
  c.data.seq_len = 256  # tokens per training sequence
  c.data.eval_fraction = 0.01  # fraction of documents held out, chosen by a hash of their key; 0: no evaluation
  # Named held-out sets, "NAME:GLOB,NAME:GLOB" (e.g. "wiki:/data/wiki/*.txt,code:/data/code/*.py"): every document
  # of each is scored at every evaluation, logged as eval_loss/<name> and eval_ppl/<name>; "": none
  c.data.eval_files = ""
  c.data.num_workers = 2  # processes that tokenize
  # tokenizer and token cache, a path or a URL; empty: $XDG_CACHE_HOME/kiln or ~/.cache/kiln. A dir written by
  # scripts/prepare_data.py (it holds prepared.json) is read as it is, and nothing is tokenized
  c.data.cache_dir = ""
  c.data.shuffle = True  # shuffle documents and rows each epoch (from train.seed)
  c.data.unit_bytes = 16 << 20  # corpus bytes per tokenization work unit: who tokenizes what, never the data order
  # sft / dpo data: chatml | llama3 | plain, or a turn format with {content} (and {role}), see data/chat.py
  c.data.chat_template = "chatml"


def _training(c: ml_collections.ConfigDict) -> None:
  c.optim = ml_collections.ConfigDict()  # the optimizer and its learning-rate schedule (docs/model.md)
  # adamw | muon (hidden matrices; AdamW for embeddings, head, norms, biases) | adafactor | lion. A run resumes
  # only with the optimizer it was saved with
  c.optim.optimizer = "adamw"
  c.optim.schedule = "cosine"  # cosine | wsd (warmup, stable, decay) | linear | constant: after a linear warmup
  c.optim.peak_lr = 3e-4  # learning rate at the end of warmup
  c.optim.final_lr = 3e-5  # learning rate at train.steps (constant: unused)
  c.optim.warmup_steps = 100  # linear warmup from 0; must be fewer than train.steps
  # wsd: the last this fraction of train.steps decays from peak_lr to final_lr (a longer resumed run moves it)
  c.optim.decay_fraction = 0.2
  c.optim.decay_shape = "linear"  # wsd's decay: linear | 1-sqrt
  c.optim.b1 = 0.9  # AdamW's first-moment decay (lion: the update's interpolation)
  c.optim.b2 = 0.95  # AdamW's second-moment decay (lion: the momentum's decay; its paper uses 0.99)
  c.optim.eps = 1e-8  # AdamW's epsilon
  c.optim.muon_momentum = 0.95  # muon: Nesterov momentum of the hidden matrices' updates
  # muon: update RMS matched to AdamW's (Moonlight), so peak_lr suits both parts; <= 0: Keller Jordan's
  # sqrt(max(1, fan_out / fan_in)) scale, which wants muon_lr_multiplier near 0.02 / peak_lr
  c.optim.muon_consistent_rms = 0.2
  c.optim.muon_lr_multiplier = 1.0  # muon: the hidden matrices' lr is the schedule's times this
  c.optim.weight_decay = 0.1  # applied to matrices only (embeddings included), never to norms or biases
  c.optim.clip_norm = 1.0  # global-norm clipping; <= 0 disables
  c.optim.zero_stage = 0  # 0 | 1 | 2: optimizer state (1) and gradients (2) sharded over `data` (needs data > 1)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer updates
  c.train.global_batch_size = 16  # sequences per optimizer update, all processes together
  c.train.grad_accum = 1  # microbatches per update; global_batch_size must divide evenly
  c.train.z_loss_weight = 0.0  # weight of log(Z)^2 of the output softmax
  c.train.log_every = 10  # steps between train lines of metrics.jsonl
  c.train.eval_every = 100  # steps between evaluations (also at step 0 and at the last step)
  c.train.eval_batches = 8  # batches per evaluation (fewer if the held-out split is small)
  # lm-evaluation-harness tasks run on the live parameters: comma-separated task names or task YAML paths
  # (e.g. examples/eval/kiln_mc.yaml), logged as eval/<task>/<metric>; "" runs none (docs/evaluation.md)
  c.train.eval_tasks = ""
  c.train.eval_tasks_every = 0  # steps between task evaluations (and at the last step); 0: at the last step only
  c.train.eval_tasks_limit = 0  # documents per task (0: all)
  c.train.seed = 0  # parameters, data order and dropout
  # lm | sft (chat JSONL) | dpo (preference JSONL) | distill (from config.distill.teacher) | grpo (prompt JSONL,
  # rewards) | module:attribute or
  # path/to/file.py:attribute naming an objectives.Objective of your own (docs/fine-tuning.md)
  c.train.objective = "lm"
  c.train.compilation_cache = True  # JAX's persistent compilation cache under `<data cache dir>/jax`
  c.train.profile_steps = 0  # > 0: trace this many steps (after the first two) into `<workdir>/tb` for TensorBoard
  # Projection weights that are zero when a step starts stay zero (fine-tuning a pruned run: scripts/prune.py)
  c.train.keep_sparsity = False


def _parallel(c: ml_collections.ConfigDict) -> None:
  c.mesh = ml_collections.ConfigDict()  # axes outermost first: stage, data, fsdp, expert, context, tensor
  # context > 1 splits each sequence over that many devices (model.context_parallel; docs/parallelism.md)
  for axis in ("stage", "data", "fsdp", "expert", "context", "tensor"):
    setattr(c.mesh, axis, -1 if axis == "data" else 1)  # devices along this axis; -1: all the remaining devices
    setattr(c.mesh, f"dcn_{axis}", 1)  # multi-slice: this axis's size across slices (over DCN)
  # Mesh axes of each logical axis name, comma-separated ("" = replicated); see docs/parallelism.md
  c.mesh.rules = ml_collections.ConfigDict(DEFAULT_RULES)

  c.pipeline = ml_collections.ConfigDict()  # used only when mesh.stage (x dcn_stage) > 1
  c.pipeline.schedule = "1f1b"  # gpipe | circular | 1f1b
  c.pipeline.microbatches = 4  # per grad_accum microbatch; at least mesh.stage
  c.pipeline.repeats = 1  # circular only (> 1): layer chunks per stage


def _fine_tuning(c: ml_collections.ConfigDict) -> None:
  # LoRA fine-tuning (rank 0: off, full fine-tuning): only the adapters train, the base (checkpoint.init_from,
  # else the seed's random init) stays frozen and out of the optimizer and the checkpoints.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # rank of the adapters; 0: no adapters
  c.lora.alpha = 16.0  # the adapter's output is scaled by alpha / rank
  c.lora.dropout = 0.0  # on the adapter's input, training only
  c.lora.targets = "q,v"  # comma-separated among q, k, v, o, gate, up, down (MoE models: attention only)
  # QLoRA: the frozen base's projections held as int8 | int4 | nf4 (model/quant.py); empty: as the base's dtype
  c.lora.base_quant = ""
  c.lora.base_group_size = 64  # lora.base_quant int4 | nf4: inputs per scale

  c.dpo = ml_collections.ConfigDict()  # train.objective=dpo
  c.dpo.beta = 0.1  # strength of the implicit KL to the reference: larger keeps the policy closer to it
  c.dpo.reference = ""  # the frozen reference run/checkpoint; empty: checkpoint.init_from, else this run's init

  # train.objective=grpo: reinforcement learning from verifiable rewards on prompt JSONL (data.files), rollouts
  # sampled by the policy being trained (docs/fine-tuning.md)
  c.grpo = ml_collections.ConfigDict()
  c.grpo.prompts_per_step = 4  # prompts per rollout; train.global_batch_size must be prompts_per_step x group_size
  c.grpo.group_size = 4  # completions sampled per prompt; advantages compare the rewards within a group
  c.grpo.max_new_tokens = 64  # most tokens per completion (a completion ends at EOS)
  c.grpo.temperature = 1.0  # sampling temperature; log-probabilities in the loss use the same
  c.grpo.top_p = 1.0  # nucleus sampling of the rollouts; 1: off
  c.grpo.top_k = 0  # top-k sampling of the rollouts; 0: off
  # comma-separated reward functions: exact_answer | format | overlong (objectives/rewards.py), or
  # module:function / path/to/file.py:function, each fn(prompts, completions, **fields) -> list[float]
  c.grpo.rewards = "exact_answer"
  c.grpo.reward_weights = ""  # comma-separated weights, one per reward function; empty: all 1
  c.grpo.format_pattern = r"(?s).*####\s*\S+"  # the `format` reward: a regex the whole stripped completion matches
  # the `overlong` reward: its penalty grows over the last this many tokens before max_new_tokens (DAPO)
  c.grpo.overlong_window = 16
  c.grpo.scale_rewards = True  # advantages divided by the group's reward std (GRPO); False as Dr. GRPO recommends
  c.grpo.epsilon = 0.2  # the ratio's clip below: 1 - epsilon
  c.grpo.epsilon_high = 0.2  # the ratio's clip above: 1 + epsilon_high (DAPO's clip-higher: 0.28)
  c.grpo.iterations = 1  # optimizer steps on each rollout batch; > 1 compares with the sampling policy's log-probs
  c.grpo.beta = 0.0  # weight of the KL to the frozen reference (k3 estimator); 0: no reference model at all
  c.grpo.reference = ""  # the reference run/checkpoint; empty: checkpoint.init_from, else this run's init (LoRA: base)
  # sequence_mean (GRPO: mean of each completion's token mean) | token_mean (DAPO) | constant (Dr. GRPO)
  c.grpo.loss_agg = "token_mean"
  c.grpo.drop_equal_groups = False  # True: groups whose rewards are all equal weigh nothing (DAPO's dynamic sampling)

  c.distill = ml_collections.ConfigDict()  # train.objective=distill
  c.distill.teacher = ""  # a run directory (or checkpoint) of any size trained with the same tokenizer
  c.distill.temperature = 2.0  # softens both distributions; the KL term is scaled by temperature^2
  c.distill.alpha = 0.5  # weight of the KL to the teacher; 1 - alpha: the usual next-token loss


def _checkpoints(c: ml_collections.ConfigDict) -> None:
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500  # steps between checkpoints (also at the last step and on preemption)
  c.checkpoint.max_to_keep = 3  # newest checkpoints kept
  c.checkpoint.keep_period = 0  # > 0: checkpoints at multiples of this step are never deleted
  # A run directory, checkpoint or export whose parameters start a new run (own step 0 and schedule); with LoRA,
  # the frozen base
  c.checkpoint.init_from = ""
  c.checkpoint.init_optimizer_state = False  # with init_from: also take its Adam moments (the schedule starts at 0)
  c.checkpoint.async_save = True  # write checkpoints in the background


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for add_group in (_model, _moe, _data, _training, _parallel, _fine_tuning, _checkpoints):
    add_group(c)
  return c
