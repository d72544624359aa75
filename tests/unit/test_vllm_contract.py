"""Contract tests: every vLLM symbol vllm-tslt calls or patches, checked in one place.

A vLLM upgrade that moves or changes one of these fails here, loudly, instead of deep in a run.
Add a test here whenever new code touches a vLLM symbol.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

pytestmark = pytest.mark.unit


def test_vllm_version_attribute():
    import vllm

    assert isinstance(vllm.__version__, str)
    assert vllm.__version__.split("+")[0] == "0.32.0"


def test_llm_generate_signature():
    from vllm import LLM

    params = inspect.signature(LLM.__init__).parameters
    for name in ("model", "dtype", "enforce_eager", "seed", "kwargs"):
        assert name in params, f"vllm.LLM.__init__ lost {name!r}"
    # LLM(**kwargs) forwards the rest to EngineArgs
    from vllm.engine.arg_utils import EngineArgs

    assert "max_model_len" in {f.name for f in dataclasses.fields(EngineArgs)}
    gen = inspect.signature(LLM.generate).parameters
    assert "use_tqdm" in gen


def test_sampling_params_fields():
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=3, temperature=0.5, seed=7, extra_args={"tslt_session": "s"})
    assert (sp.max_tokens, sp.temperature, sp.seed) == (3, 0.5, 7)
    assert sp.extra_args == {"tslt_session": "s"}


# --- patches/cpu_expand.py -------------------------------------------------------------------


def test_cpu_expand_patch_targets_exist():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.triton_utils import dispatcher
    from vllm.utils import cpu_triton_utils
    from vllm.v1.sample import rejection_sampler

    assert callable(cpu_triton_utils._expand_kernel_impl)
    params = list(inspect.signature(cpu_triton_utils._expand_kernel_impl).parameters)
    assert params == ["output", "input_val", "cu_num_tokens", "replace_from", "replace_to",
                      "MAX_NUM_TOKENS"]
    assert callable(dispatcher.register_kernels) and isinstance(dispatcher._registry, dict)
    assert callable(CpuPlatform.register_triton_kernel_overrides)
    assert hasattr(rejection_sampler, "expand_kernel")
    sig = inspect.signature(rejection_sampler.expand_batch_to_tokens).parameters
    assert list(sig)[:3] == ["x", "cu_num_tokens", "num_tokens"]


def test_kernel_override_can_be_retargeted_in_place():
    """cpu_expand.retarget_override changes a registered KernelOverride's target in place."""
    from vllm.triton_utils import dispatcher

    assert callable(dispatcher._resolve_kernel) and callable(dispatcher._rebind_kernels)
    wrapper = dispatcher.KernelOverride(lambda a, b: None, lambda a, b: "old")
    for attr in ("_impl", "func", "_forward_by_name", "arg_names"):
        assert hasattr(wrapper, attr), attr
    wrapper._impl = wrapper.func = lambda a, b: "new"
    assert wrapper[1](1, 2) == "new" and wrapper(1, 2) == "new"


def test_plugins_load_before_kernel_overrides_in_workers():
    """The fix relies on this order in WorkerWrapperBase (general plugins, then CPU overrides)."""
    from vllm.v1.worker import worker_base

    src = inspect.getsource(worker_base)
    plugins_at = src.index("load_general_plugins()")
    overrides_at = src.index("register_triton_kernel_overrides()")
    assert plugins_at < overrides_at


# --- patches/spec_config.py ------------------------------------------------------------------


def test_create_speculative_config_contract():
    from vllm.config import SpeculativeConfig
    from vllm.engine.arg_utils import EngineArgs

    params = list(inspect.signature(EngineArgs.create_speculative_config).parameters)
    assert params == ["self", "target_model_config", "target_parallel_config"]
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    assert {"speculative_config", "additional_config"} <= names
    assert "custom_class" in str(SpeculativeConfig.__dataclass_fields__["method"].type)


def test_colocated_baseline_options_contract():
    """The benchmark's co-located baseline (vllm_tslt/bench/main.py) asks vLLM's draft_model for
    probabilistic drafts (q-based acceptance, like ours); the options must exist."""
    from vllm.config import SpeculativeConfig

    fields = SpeculativeConfig.__dataclass_fields__
    assert "draft_model" in str(fields["method"].type)
    assert "probabilistic" in str(fields["draft_sample_method"].type)


# --- patches/runner.py and edge/proposer.py -----------------------------------------------------


def test_model_runner_hooks_contract():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    propose = inspect.signature(GPUModelRunner.propose_draft_token_ids).parameters
    assert list(propose)[:3] == ["self", "scheduler_output", "sampled_token_ids"]
    probs = inspect.signature(GPUModelRunner._get_spec_decode_draft_probs).parameters
    assert list(probs) == ["self", "spec_decode_metadata"]
    update = inspect.signature(GPUModelRunner._update_states).parameters
    assert list(update) == ["self", "scheduler_output"]
    # Called before execute_model's early return for a step with nothing to compute.
    src_exec = inspect.getsource(GPUModelRunner.execute_model)
    assert src_exec.index("self._update_states(scheduler_output)") < src_exec.index(
        "EMPTY_MODEL_RUNNER_OUTPUT")
    # the CPU runner inherits all three (our wrappers sit on GPUModelRunner)
    for name in ("propose_draft_token_ids", "_get_spec_decode_draft_probs", "_update_states"):
        assert name not in CPUModelRunner.__dict__
    src = inspect.getsource(GPUModelRunner.propose_draft_token_ids)
    assert 'spec_config.method == "custom_class"' in src
    assert "self.input_batch.num_tokens_no_spec" in src and "self.input_batch.token_ids_cpu" in src
    assert "_get_spec_decode_draft_probs(spec_decode_metadata)" in inspect.getsource(
        GPUModelRunner._sample)


def test_runner_state_the_proxy_reads():
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    assert {"prompt_token_ids", "sampling_params", "output_token_ids"} <= set(
        CachedRequestState.__dataclass_fields__)
    assert "finished_req_ids" in SchedulerOutput.__dataclass_fields__
    assert {"draft_token_ids", "num_draft_tokens"} <= set(SpecDecodeMetadata.__dataclass_fields__)
    # Commit.verified: the draft tokens the step verified per request, after the scheduler's cuts
    # (TsltProposer.bind_step; the model runner builds its spec-decode metadata from the same map)
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert "scheduled_spec_decode_tokens" in SchedulerOutput.__dataclass_fields__
    assert "scheduled_spec_decode_tokens" in inspect.getsource(GPUModelRunner._prepare_inputs)


def test_custom_proposer_factory_contract():
    from vllm.v1.spec_decode import custom_class_proposer

    src = inspect.getsource(custom_class_proposer.create_custom_proposer)
    assert "user_class(vllm_config)" in src and "spec_config.model" in src


# --- edge/verify.py (the fused verifier) -------------------------------------------------------


def test_rejection_sample_contract():
    from vllm.v1.sample import rejection_sampler as rs

    params = list(inspect.signature(rs.rejection_sample).parameters)
    assert params[:8] == ["draft_token_ids", "num_draft_tokens", "max_spec_len",
                          "cu_num_draft_tokens", "draft_probs", "target_logits",
                          "bonus_token_ids", "sampling_metadata"]
    assert "use_fp64_gumbel" in params
    assert list(inspect.signature(rs.generate_uniform_probs).parameters) == [
        "num_tokens", "num_draft_tokens", "generators", "device"]
    assert rs.GREEDY_TEMPERATURE == 0 and rs.PLACEHOLDER_TOKEN_ID == -1
    # RejectionSampler.forward looks rejection_sample up at call time (module global)
    assert "rejection_sample(" in inspect.getsource(rs.RejectionSampler.forward)
    src = inspect.getsource(rs.sample_recovered_tokens)
    assert "q.exponential_()" in src and "q[i].exponential_(generator=generator)" in src


# --- serve.py -----------------------------------------------------------------------------------


def test_cli_main_asks_metadata_for_vllm():
    from vllm.entrypoints.cli import main as cli_main

    assert 'importlib.metadata.version("vllm")' in inspect.getsource(cli_main.main)


# --- patches/runner.py `_sample` (no draft rows: plain sampler) ---------------------------------


def test_sample_hook_contract():
    """`_sample(logits, spec_decode_metadata)` takes the plain sampler for None, and the rejection
    sampler draws every token of a draftless request with the same sampler (bonus path), while its
    uniforms and recovery noise skip requests with no draft tokens (seeded streams unchanged)."""
    from vllm.v1.sample import rejection_sampler as rs
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert list(inspect.signature(GPUModelRunner._sample).parameters) == [
        "self", "logits", "spec_decode_metadata"]
    src = inspect.getsource(GPUModelRunner._sample)
    assert "if spec_decode_metadata is None:" in src and "return self.sampler(" in src
    assert "_sample" not in __import__("vllm.v1.worker.cpu_model_runner",
                                       fromlist=["CPUModelRunner"]).CPUModelRunner.__dict__
    assert "self.max_spec_len = max(self.num_draft_tokens)" in inspect.getsource(
        SpecDecodeMetadata)
    forward = inspect.getsource(rs.RejectionSampler.forward)
    assert "bonus_sampler_output = self.sampler(" in forward
    assert "if n == 0:\n            continue" in inspect.getsource(rs.generate_uniform_probs)
    assert "if num_draft_tokens[i] > 0:" in inspect.getsource(rs.sample_recovered_tokens)


# --- patches/engine.py (no draft round trip without sessions) -----------------------------------


def test_post_step_contract():
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    assert list(inspect.signature(EngineCore.post_step).parameters) == ["self", "model_executed"]
    src = inspect.getsource(EngineCore.post_step)
    assert "self.model_executor.take_draft_token_ids()" in src
    assert "self.scheduler.update_draft_token_ids(draft_token_ids)" in src
    assert "self.vllm_config = vllm_config" in inspect.getsource(EngineCore.__init__)
    # drafts are consumed when scheduled: skipping a take leaves no stale ids behind
    assert "request.spec_token_ids = []" in inspect.getsource(Scheduler.schedule)
    assert "self.running" in inspect.getsource(Scheduler.__init__)


def test_executor_init_contract():
    """patches/draft_flag.py: the key set in Executor.__init__ (before _init_executor() starts the
    workers) reaches them; EngineCore builds its executor in its own process."""
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    from vllm_tslt.patches import draft_flag

    init = inspect.unwrap(Executor.__init__)  # vLLM's, patched or not
    assert draft_flag.PATCH.owner == "vllm.v1.executor.abstract:Executor"
    assert list(inspect.signature(init).parameters)[:2] == ["self", "vllm_config"]
    assert "self._init_executor()" in inspect.getsource(init)
    assert "super().__init__(vllm_config)" in inspect.getsource(MultiprocExecutor.__init__)
    assert "WorkerProc.make_worker_process" in inspect.getsource(MultiprocExecutor._init_executor)
    assert "self.model_executor = executor_class(vllm_config)" in \
        inspect.getsource(EngineCore.__init__)


def test_any_request_has_session():
    from types import SimpleNamespace as NS

    from vllm import SamplingParams

    from vllm_tslt.edge.proposer import SESSION_KEY
    from vllm_tslt.patches import engine

    assert engine.SESSION_KEY == SESSION_KEY
    plain = NS(sampling_params=SamplingParams(max_tokens=3))
    bound = NS(sampling_params=SamplingParams(max_tokens=3, extra_args={SESSION_KEY: "s"}))
    pooling = NS(sampling_params=None)
    assert not engine.any_request_has_session([plain, pooling])
    assert engine.any_request_has_session([plain, bound])


# --- patches/structured.py (structured outputs: the first invalid draft token is kept) ----------


def test_structured_output_contract():
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager, backend_xgrammar

    from vllm_tslt.patches.structured import EXPECTED_REJECT_MESSAGES

    assert list(inspect.signature(StructuredOutputManager.validate_tokens).parameters) == [
        "self", "request", "spec_tokens"]
    # the scheduler's only uses: sync path (ours) and async path (pads with -1)
    assert "self.structured_output_manager.validate_tokens(" in inspect.getsource(
        Scheduler.update_draft_token_ids)
    # the bitmask row of a draft position is filled before the grammar tries to advance with it
    fill = inspect.getsource(StructuredOutputManager.grammar_bitmask)
    assert fill.index("self._fill_bitmasks(((grammar, cumulative_index, apply_bitmask),))") < \
        fill.index("grammar.accept_tokens(")
    import vllm.v1.structured_output as so_module

    for logger_name, message in EXPECTED_REJECT_MESSAGES.items():
        module = so_module if logger_name == "vllm.v1.structured_output" else backend_xgrammar
        assert module.logger.name == logger_name
        assert " ".join(message.split()) in " ".join(
            inspect.getsource(module).replace('"\n', "").replace('                "', "")
            .split()), message
    # xgrammar refuses an invalid token without changing state (returns False)
    assert "if not self.matcher.accept_token(token):" in inspect.getsource(
        backend_xgrammar.XgrammarGrammar.accept_tokens)
    # the frontend records which backend serves a request; both our processes read it
    assert "_backend" in StructuredOutputsParams.__dataclass_fields__
    assert "self.vllm_config = vllm_config" in inspect.getsource(StructuredOutputManager.__init__)


# --- edge/parallel.py + patches (issue 15: TP, DP, PP) ------------------------------------------


def test_tensor_parallel_contract():
    """Rank 0 of the TP group is the output rank (PP = 1) and owns the hub; broadcast_object from
    src=0 is the collective every rank makes for the q̃ rows; ranks sample after an all-gather."""
    from vllm.distributed import parallel_state
    from vllm.distributed.parallel_state import GroupCoordinator, get_tp_group
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert parallel_state.get_tp_group is get_tp_group
    assert list(inspect.signature(GroupCoordinator.broadcast_object).parameters) == [
        "self", "obj", "src"]
    broadcast = inspect.getsource(GroupCoordinator.broadcast_object)
    assert "if self.world_size == 1:" in broadcast and "group=self.cpu_group" in broadcast
    init = inspect.getsource(GroupCoordinator.__init__)
    assert "self.rank_in_group" in init and "self.cpu_group" in init
    # drafts reach the scheduler from the output rank only: TP rank 0 of the last PP stage
    output_rank = inspect.getsource(MultiprocExecutor._get_output_rank)
    assert "self.world_size" in output_rank and "tensor_parallel_size" in output_rank
    take = inspect.getsource(MultiprocExecutor.take_draft_token_ids)
    assert "unique_reply_rank=self.output_rank" in take
    # every rank builds a custom_class drafter and runs the sampler (rejection sampler included)
    assert "create_custom_proposer(" in inspect.getsource(GPUModelRunner.__init__)
    assert "sampled_token_ids" in SamplerOutput.__dataclass_fields__
    sample = inspect.getsource(GPUModelRunner._sample)
    assert "self._get_spec_decode_draft_probs(spec_decode_metadata)" in sample


def test_data_and_pipeline_parallel_config_contract():
    from vllm.config import ParallelConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.core import EngineCoreProc

    fields = ParallelConfig.__dataclass_fields__ if hasattr(
        ParallelConfig, "__dataclass_fields__") else ParallelConfig.model_fields
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                 "data_parallel_size_local", "data_parallel_rank", "data_parallel_rank_local",
                 "data_parallel_index", "data_parallel_external_lb", "data_parallel_hybrid_lb"):
        assert name in fields, name
    # a dense model's DP engine is reconfigured as DP=1 but keeps its index and LB flags
    reconfigure = inspect.getsource(ParallelConfig.reconfigure_for_independent_dp_rank)
    for kept in ("data_parallel_index", "data_parallel_rank_local", "_lb"):
        assert kept not in reconfigure, kept
    run = inspect.getsource(EngineCoreProc.run_engine_core)
    assert "parallel_config.data_parallel_index = dp_rank" in run
    assert "parallel_config.data_parallel_rank_local = local_dp_rank" in run
    # the PP refusal runs where the tslt options are rewritten, with the target's parallel config
    assert list(inspect.signature(EngineArgs.create_speculative_config).parameters) == [
        "self", "target_model_config", "target_parallel_config"]


def test_data_parallel_route_header_contract():
    """X-data-parallel-rank picks the engine (index into the API server's engines: global rank
    with the internal LB, local index with the hybrid LB); out of range is a 400, not a crash."""
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.v1.engine.core_client import DPLBAsyncMPClient
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_tslt.edge.parallel import ROUTE_HEADER

    assert f'raw_request.headers.get("{ROUTE_HEADER}")' in inspect.getsource(
        GenerateBaseServing._get_data_parallel_rank)
    assert "eng_index := request.data_parallel_rank" in inspect.getsource(
        DPLBAsyncMPClient.get_core_engine_for_request)
    assert "local_engines_only" in inspect.getsource(InputProcessor.process_inputs)


def test_cpu_thread_binding_contract():
    """VLLM_CPU_OMP_THREADS_BIND: "auto" needs a NUMA node per local worker; a "|" list has one
    entry per worker of every local DP engine (sliced by local DP rank)."""
    from vllm import envs as vllm_envs
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    assert "VLLM_CPU_OMP_THREADS_BIND" in vllm_envs.environment_variables
    parse = inspect.getsource(OMPProcessManager._parse_omp_threads_bind_env)
    assert 'vllm_mask.split("|")' in parse
    assert "local_dp_rank * world_size : (local_dp_rank + 1) * world_size" in parse
    assert "Not enough allowed NUMA nodes" in inspect.getsource(
        OMPProcessManager._get_autobind_cpu_ids)


def test_metrics_registry_contract():
    """patches/metrics.py: /metrics is built on the registry get_prometheus_registry() returns,
    looked up by name in the instrumentator module; multiprocess mode returns a fresh one."""
    from vllm.entrypoints.serve.instrumentator import metrics
    from vllm.v1.metrics import prometheus

    assert "registry = get_prometheus_registry()" in inspect.getsource(metrics.attach_router)
    assert "make_asgi_app(registry=registry)" in inspect.getsource(metrics.attach_router)
    source = inspect.getsource(prometheus.get_prometheus_registry)
    assert "registry = CollectorRegistry()" in source and "PROMETHEUS_MULTIPROC_DIR" in source
    # ... and the /metrics handler then scrapes a fresh multiprocess registry: ours is left out
    from prometheus_fastapi_instrumentator import Instrumentator

    expose = inspect.getsource(Instrumentator.expose)
    assert "ephemeral_registry = CollectorRegistry()" in expose
    assert "multiprocess.MultiProcessCollector(ephemeral_registry)" in expose


# --- patches/scheduler.py + runner.py take_draft_token_ids (edge/intake.py: parking) -------------


def test_parking_hook_contract():
    """A running request is skipped for one schedule() call when current_step + 2 is set as its
    next_decode_eligible_step between two steps; nothing else in the synchronous scheduler reads
    or resets that field; the model runner keeps the state of a running request left out."""
    from vllm.v1.core.sched import scheduler as scheduler_module
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert "self.next_decode_eligible_step = 0" in inspect.getsource(Request.__init__)
    assert "self.current_step = 0" in inspect.getsource(Scheduler.__init__)
    src = inspect.getsource(Scheduler.schedule)
    step_at = src.index("self.current_step += 1")
    running_loop = src.index("while req_index < len(self.running)")
    skip = "if self.current_step < request.next_decode_eligible_step:\n"
    skip_at = src.index(skip)
    assert step_at < running_loop < skip_at
    assert src[skip_at + len(skip):].lstrip().startswith("# ") or \
        src[skip_at + len(skip):].lstrip().startswith("req_index += 1")
    after = src[skip_at:skip_at + 400]
    assert "req_index += 1\n" in after and "continue" in after
    # read once (the skip), written nowhere in the synchronous scheduler
    assert inspect.getsource(scheduler_module).count("request.next_decode_eligible_step") == 1
    assert "next_decode_eligible_step =" not in inspect.getsource(scheduler_module)
    # update_draft_token_ids: (self, DraftTokenIds); skips finished requests itself
    params = list(inspect.signature(Scheduler.update_draft_token_ids).parameters)
    assert params == ["self", "draft_token_ids"]
    assert "self.requests.get(req_id)" in inspect.getsource(Scheduler.update_draft_token_ids)
    init = inspect.getsource(Scheduler.__init__)
    assert "self.requests: dict[str, Request]" in init and "self.running: list[Request]" in init
    # a running request not scheduled leaves the persistent batch and comes back, state kept
    update = inspect.getsource(GPUModelRunner._update_states)
    assert "unscheduled_req_ids" in update and "self.input_batch.remove_request(req_id)" in update
    assert "scheduled in the previous step and needs to be added again" in update


def test_take_draft_token_ids_contract():
    from vllm.v1.outputs import DraftTokenIds
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert list(inspect.signature(GPUModelRunner.take_draft_token_ids).parameters) == ["self"]
    assert "take_draft_token_ids" not in CPUModelRunner.__dict__
    # req_ids may be the input batch's live list: with_intake copies it
    assert "return self._draft_token_ids, self.input_batch.req_ids" in inspect.getsource(
        GPUModelRunner._get_draft_token_ids_cpu)
    assert [f.name for f in dataclasses.fields(DraftTokenIds)] == ["req_ids", "draft_token_ids"]
    ids = DraftTokenIds(["a"], [[1]])
    ids.tslt_park = ("b",)  # no __slots__: the park list rides along (pickled with it)
    import pickle

    assert pickle.loads(pickle.dumps(ids)).tslt_park == ("b",)


def test_with_intake_and_park_requests():
    from types import SimpleNamespace as NS

    from vllm.v1.outputs import DraftTokenIds

    from vllm_tslt.patches.scheduler import PARK_ATTR, park_requests, with_intake

    live = ["a"]
    base = DraftTokenIds(live, [[1, 2]])
    assert with_intake(base, {}, []) is base
    out = with_intake(base, {"p": [7, 8]}, ["q"])
    assert out.req_ids == ["a", "p"] and out.draft_token_ids == [[1, 2], [7, 8]]
    assert getattr(out, PARK_ATTR) == ("q",) and live == ["a"]  # the live list untouched
    assert with_intake(None, {"p": [3]}, []).req_ids == ["p"]

    def req(finished=False):
        return NS(next_decode_eligible_step=0, is_finished=lambda: finished)

    running, done, waiting = req(), req(True), req()
    sched = NS(current_step=7, running=[running, done],
               requests={"r": running, "d": done, "w": waiting})
    assert park_requests(sched, ["r", "d", "w", "gone"]) == 1
    assert running.next_decode_eligible_step == 9  # schedule() makes it 8 < 9: skipped once
    assert done.next_decode_eligible_step == 0 and waiting.next_decode_eligible_step == 0
