//! The job API: what a service writes. In the spirit of Flink's DataStream API:
//!
//! ```no_run
//! use weir::job::{Job, JobConfig};
//! use weir::sink::CollectSink;
//! use weir::source::VecSource;
//!
//! let job = Job::new("word-count");
//! let counts = CollectSink::new();
//! job.source("lines", VecSource::new(vec!["a b".to_string(), "b c".to_string()]))
//!     .flat_map("split", |line: String| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
//!     .key_by("by-word", |word: &String| word.clone())
//!     .reduce("count", |word: &String| (word.clone(), 0u64), |(w, n): (String, u64), _word: String| (w, n + 1))
//!     .sink("out", counts.clone());
//! job.run(JobConfig::default()).unwrap().wait().unwrap();
//! ```
//!
//! A [`Stream`] carries its chain as a type ([`crate::chain::ChainSpec`]): `map`, `filter` and
//! `flat_map` extend the chain; `key_by`, `rebalance`, `broadcast` and sinks end it, closing a
//! *stage* (a chain between two exchanges). Each stage runs as one task on every shard.

use std::cell::RefCell;
use std::collections::HashSet;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use weir_operators::operator::{Keyed, Operator, OutputTag};
use weir_operators::process::{KeyedProcessFunction, KeyedProcessOperator};
use weir_operators::time::{RecordTimestamp, TimestampAssigner, WatermarkGenerator, WatermarkStrategy};
use weir_operators::window::TimeWindow;
use weir_operators::window::assigner::WindowAssigner;
use weir_operators::window::lateness::AllowedLateness;
use weir_operators::window::operator::{AggregateFunction, CountWindowOperator, Reduce, WindowOperator};
use weir_state::keygroup::KeyEncode;
use weir_state::states::StateValue;

use crate::chain::{ChainSpec, FilterSpec, FlatMapSpec, Identity, MapSpec, OperatorSpec};
use crate::clock::{Clock, SystemClock};
use crate::error::{Result, RuntimeError};
use crate::sink::Sink;
use crate::source::Source;
use crate::stage::{
    ConnectionId, ExchangeInput, Partitioner, Route, RouteSpec, SideOutput, SideOutputSpec, SinkSpec, SourceInput,
    StageFactory, StageInput, StageSpec, TerminalSpec,
};
use weir_operators::reduce::ReduceOperator;

/// How a job runs.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Number of shards (executors). Default: the cores available.
    pub parallelism: usize,
    /// Number of key groups; fixed for the life of a job's state. Default 4096.
    pub max_parallelism: u16,
    /// Where shards keep their state stores (a fresh subdirectory per run).
    pub data_dir: PathBuf,
    /// Records per exchange batch.
    pub batch_len: usize,
    /// Batches a channel holds before the sender waits (backpressure).
    pub channel_capacity: usize,
    /// Records a source reads per step.
    pub source_batch: usize,
    /// Interval of periodic watermark emission and processing-time ticks, milliseconds.
    pub tick_interval_ms: i64,
    /// Size of state segment files.
    pub segment_bytes: u32,
    /// Keep the state directories after the job ends (they are removed by default).
    pub keep_state: bool,
    /// The processing-time clock.
    pub clock: Arc<dyn Clock>,
    /// Checkpoints, recovery and restarts (`None`: the job runs without checkpoints).
    pub checkpointing: Option<crate::checkpointing::CheckpointSettings>,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            parallelism: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_parallelism: weir_state::keygroup::DEFAULT_MAX_PARALLELISM,
            data_dir: PathBuf::from("weir-data"),
            batch_len: 256,
            channel_capacity: 16,
            source_batch: 512,
            tick_interval_ms: 50,
            segment_bytes: 64 << 20,
            keep_state: false,
            clock: Arc::new(SystemClock),
            checkpointing: None,
        }
    }
}

impl JobConfig {
    /// This configuration with `parallelism` shards.
    pub fn with_parallelism(mut self, parallelism: usize) -> Self {
        self.parallelism = parallelism.max(1);
        self
    }

    /// This configuration with checkpoints as `settings` say.
    pub fn with_checkpointing(mut self, settings: crate::checkpointing::CheckpointSettings) -> Self {
        self.checkpointing = Some(settings);
        self
    }
}

/// The job graph while it is being built.
#[derive(Default)]
pub(crate) struct Graph {
    pub(crate) stages: Vec<Arc<dyn StageFactory>>,
    pub(crate) connections: Vec<(ConnectionId, crate::runner::MeshMaker, bool)>,
    uids: HashSet<&'static str>,
    errors: Vec<String>,
}

impl Graph {
    fn claim_uid(&mut self, uid: &'static str) {
        if !self.uids.insert(uid) {
            self.errors.push(format!("uid {uid:?} is used twice"));
        }
    }

    /// A new connection carrying `T`; `forward` when every shard only sends to itself.
    fn connection<T: Send + 'static>(&mut self, forward: bool) -> ConnectionId {
        let id = ConnectionId(self.connections.len());
        self.connections.push((id, crate::runner::mesh_maker::<T>(), forward));
        id
    }
}

/// A job under construction. Cheap to clone (a handle on one graph).
#[derive(Clone)]
pub struct Job {
    name: String,
    graph: Rc<RefCell<Graph>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("name", &self.name).finish()
    }
}

impl Job {
    /// An empty job.
    pub fn new(name: &str) -> Job {
        Job { name: name.to_owned(), graph: Rc::new(RefCell::new(Graph::default())) }
    }

    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A parallel source without event time (timestamps are `i64::MIN`; only the end of input
    /// advances event time). Use [`Job::source_with_watermarks`] for event time.
    pub fn source<S: Source>(&self, uid: &'static str, source: S) -> Stream<S::Out, Identity>
    where
        S::Out: 'static,
    {
        self.source_with_watermarks(uid, source, WatermarkStrategy::new(NoWatermarks))
    }

    /// A parallel source with a watermark strategy (timestamps, watermarks, idleness).
    pub fn source_with_watermarks<S, G, A>(
        &self,
        uid: &'static str,
        source: S,
        strategy: WatermarkStrategy<G, A>,
    ) -> Stream<S::Out, Identity>
    where
        S: Source,
        G: WatermarkGenerator<S::Out> + Clone + Send + Sync + 'static,
        A: TimestampAssigner<S::Out> + Clone + Send + Sync + 'static,
    {
        self.graph.borrow_mut().claim_uid(uid);
        let input: Box<dyn StageInput<S::Out>> = Box::new(SourceInput::new(uid, source, strategy));
        Stream::new(self.clone(), input)
    }

    /// Starts the job on its shards and returns at once.
    pub fn run(&self, config: JobConfig) -> Result<crate::runner::JobHandle> {
        let graph = self.graph.borrow();
        if let Some(e) = graph.errors.first() {
            return Err(RuntimeError::InvalidJob(e.clone()));
        }
        if graph.stages.is_empty() {
            return Err(RuntimeError::InvalidJob("the job has no sink".into()));
        }
        // A connection nobody reads would fill up and stall its writers for good.
        let read: HashSet<ConnectionId> = graph.stages.iter().flat_map(|stage| stage.inputs()).collect();
        if let Some((unread, ..)) = graph.connections.iter().find(|(id, ..)| !read.contains(id)) {
            return Err(RuntimeError::InvalidJob(format!(
                "a stream is never closed (connection {}): end every stream, side outputs included, in a sink",
                unread.0
            )));
        }
        let mut operators: Vec<String> = graph.uids.iter().map(|u| (*u).to_owned()).collect();
        operators.sort();
        crate::runner::start(&self.name, graph.stages.clone(), &graph.connections, operators, config)
    }

    fn add_stage(&self, stage: Arc<dyn StageFactory>) {
        self.graph.borrow_mut().stages.push(stage);
    }
}

/// A watermark generator that never emits: records keep the timestamp their source gives
/// (none), and event time only ends with the input.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoWatermarks;

impl<T> WatermarkGenerator<T> for NoWatermarks {
    fn on_event(&mut self, _: &T, _: i64, _: &mut weir_operators::time::WatermarkOutput) {}
    fn on_periodic_emit(&mut self, _: i64, _: &mut weir_operators::time::WatermarkOutput) {}
}

/// Marker to keep [`RecordTimestamp`] in the public vocabulary of sources without event time.
pub type NoTimestamps = RecordTimestamp;

/// A stream of `C::Out` whose stage started with elements of type `In`.
pub struct Stream<In: 'static, C> {
    job: Job,
    input: Option<Box<dyn StageInput<In>>>,
    chain: C,
    /// Side outputs of this stream's stage that other streams read.
    sides: RefCell<Vec<Box<dyn SideOutputSpec>>>,
    _t: PhantomData<fn(In)>,
}

impl<In: 'static> Stream<In, Identity> {
    /// The start of a stage reading `input`.
    fn new(job: Job, input: Box<dyn StageInput<In>>) -> Self {
        Stream { job, input: Some(input), chain: Identity, sides: RefCell::default(), _t: PhantomData }
    }
}

impl<In: 'static, C: ChainSpec<In>> Stream<In, C> {
    fn with<D>(mut self, chain: impl FnOnce(C) -> D) -> Stream<In, D> {
        Stream {
            job: self.job.clone(),
            input: self.input.take(),
            chain: chain(self.chain),
            sides: RefCell::new(self.sides.take()),
            _t: PhantomData,
        }
    }

    /// The records that the operators of this stream's stage (its chain so far and what is
    /// chained to it later) emit under `tag`, as a stream of their own: Flink's
    /// `getSideOutput`. Call it before the stream is closed (by a sink, `key_by`, `rebalance`,
    /// `broadcast` or `union`).
    ///
    /// The side stream runs on the same shards, carries the stage's watermarks (so it can be
    /// windowed), and takes part in checkpoints like any other stream. Records under a tag that
    /// no stream reads are kept for [`crate::runner::JobReport::side_output`] instead.
    pub fn side_output<T: Send + 'static>(&self, uid: &'static str, tag: OutputTag<T>) -> Stream<T, Identity> {
        self.claim(uid);
        if self.sides.borrow().iter().any(|side| side.tag() == tag.name()) {
            let error = format!("side output {:?} is read twice ({uid:?})", tag.name());
            self.job.graph.borrow_mut().errors.push(error);
        }
        let conn = self.job.graph.borrow_mut().connection::<T>(true);
        self.sides.borrow_mut().push(Box::new(SideOutput::<T>::new(tag.name(), conn)));
        Stream::new(self.job.clone(), Box::new(ExchangeInput::new(uid, vec![conn])))
    }

    fn claim(&self, uid: &'static str) {
        self.job.graph.borrow_mut().claim_uid(uid);
    }

    /// One output per record.
    pub fn map<U, F>(self, uid: &'static str, f: F) -> Stream<In, MapSpec<C, F>>
    where
        F: Fn(C::Out) -> U + Clone + Send + Sync + 'static,
        U: 'static,
    {
        self.claim(uid);
        self.with(|chain| MapSpec { chain, uid, f })
    }

    /// Keeps the records for which `f` holds.
    pub fn filter<F>(self, uid: &'static str, f: F) -> Stream<In, FilterSpec<C, F>>
    where
        F: Fn(&C::Out) -> bool + Clone + Send + Sync + 'static,
    {
        self.claim(uid);
        self.with(|chain| FilterSpec { chain, uid, f })
    }

    /// Any number of outputs per record.
    pub fn flat_map<I, F>(self, uid: &'static str, f: F) -> Stream<In, FlatMapSpec<C, F>>
    where
        F: Fn(C::Out) -> I + Clone + Send + Sync + 'static,
        I: IntoIterator + 'static,
        I::Item: 'static,
    {
        self.claim(uid);
        self.with(|chain| FlatMapSpec { chain, uid, f })
    }

    /// A custom single-input operator, one instance per shard made by `factory`.
    pub fn operator<O, F>(self, uid: &'static str, factory: F) -> Stream<In, OperatorSpec<C, F>>
    where
        F: Fn() -> O + Send + Sync + 'static,
        O: Operator<In = C::Out>,
    {
        self.claim(uid);
        self.with(|chain| OperatorSpec { chain, uid, factory: Arc::new(factory) })
    }

    fn close<Term: TerminalSpec<C::Out>>(mut self, terminal: Term, output: Option<ConnectionId>, forward: bool) -> Job {
        let Some(input) = self.input.take() else {
            self.job.graph.borrow_mut().errors.push("a stream was closed twice".into());
            return self.job;
        };
        let stage: Arc<dyn StageFactory> =
            Arc::new(StageSpec::new(input, self.chain.clone(), terminal, output, forward, self.sides.take()));
        self.job.add_stage(stage);
        self.job
    }

    /// Partitions the stream by key: each record goes to the shard that owns its key's key
    /// group, together with its key. What reads the keyed stream decides what crosses the
    /// exchange (a keyed operator, a window, or one side of a connected stream).
    pub fn key_by<K, F>(self, uid: &'static str, key: F) -> KeyedStream<K, C::Out, In, C, F>
    where
        K: KeyEncode + Clone + Send + 'static,
        C::Out: Send,
        F: Fn(&C::Out) -> K + Clone + Send + Sync + 'static,
    {
        self.claim(uid);
        KeyedStream { upstream: self, uid, key, _t: PhantomData }
    }

    /// Redistributes records round-robin over all shards.
    pub fn rebalance(self, uid: &'static str) -> Stream<C::Out, Identity>
    where
        C::Out: Send + Clone,
    {
        self.claim(uid);
        let conn = self.job.graph.borrow_mut().connection::<C::Out>(false);
        let job = self.close(RouteSpec::new(Route::RoundRobin), Some(conn), false);
        let input: Box<dyn StageInput<C::Out>> = Box::new(ExchangeInput::new(uid, vec![conn]));
        Stream::new(job, input)
    }

    /// Sends every record to every shard.
    pub fn broadcast(self, uid: &'static str) -> Stream<C::Out, Identity>
    where
        C::Out: Send + Clone,
    {
        self.claim(uid);
        let conn = self.job.graph.borrow_mut().connection::<C::Out>(false);
        let job = self.close(RouteSpec::new(Route::Broadcast), Some(conn), false);
        let input: Box<dyn StageInput<C::Out>> = Box::new(ExchangeInput::new(uid, vec![conn]));
        Stream::new(job, input)
    }

    /// Merges this stream with `other` (same type): the result reads both, on each shard, and
    /// its watermark is the minimum of both.
    pub fn union<C2: ChainSpec<In2, Out = C::Out>, In2: 'static>(
        self,
        uid: &'static str,
        other: Stream<In2, C2>,
    ) -> Stream<C::Out, Identity>
    where
        C::Out: Send + Clone,
    {
        self.claim(uid);
        let (a, b) = {
            let mut graph = self.job.graph.borrow_mut();
            (graph.connection::<C::Out>(true), graph.connection::<C::Out>(true))
        };
        let job = self.close(RouteSpec::new(Route::Forward), Some(a), true);
        other.close(RouteSpec::new(Route::Forward), Some(b), true);
        let input: Box<dyn StageInput<C::Out>> = Box::new(ExchangeInput::new(uid, vec![a, b]));
        Stream::new(job, input)
    }

    /// Ends the stream in `sink`.
    pub fn sink<S: Sink<In = C::Out>>(self, uid: &'static str, sink: S) -> Job {
        self.claim(uid);
        self.close(SinkSpec::new(uid, sink), None, false)
    }
}

/// The window function of [`WindowedStream::reduce`]: labels a result with key and window.
pub type Labelled<K, T> = fn(&K, TimeWindow, T) -> (K, TimeWindow, T);

/// The operator behind [`WindowedStream::reduce`].
pub type ReduceWindow<K, T, W, F> = WindowOperator<K, Reduce<T, F>, W, Labelled<K, T>>;

/// A keyed stream with a window assigner, waiting for its aggregation.
pub struct WindowedStream<K, T, In: 'static, C, KF, W> {
    keyed: KeyedStream<K, T, In, C, KF>,
    uid: &'static str,
    assigner: W,
    lateness: AllowedLateness,
    late_data: Option<OutputTag<Keyed<K, T>>>,
}

impl<K, T, In, C, KF, W> WindowedStream<K, T, In, C, KF, W>
where
    K: KeyEncode + StateValue + Clone + Send + 'static,
    T: Clone + Send + 'static,
    In: 'static,
    C: ChainSpec<In, Out = T>,
    KF: Fn(&T) -> K + Clone + Send + Sync + 'static,
    W: WindowAssigner<Window = TimeWindow> + Clone + Send + Sync + 'static,
{
    /// Keeps each window's state `lateness_ms` past its end: later records update it and fire
    /// it again; records later than that go to the [`weir_operators::window::operator::LATE`] side output.
    pub fn allowed_lateness(mut self, lateness_ms: i64) -> Self {
        self.lateness = AllowedLateness::from_ms(lateness_ms);
        self
    }

    /// Sends records too late for all their windows, themselves (key, value and timestamp),
    /// to the side output `tag` instead of a [`weir_operators::window::operator::LateRecord`]
    /// under `LATE`; read them with [`Stream::side_output`] on the windowed result (Flink's
    /// `sideOutputLateData`).
    pub fn side_output_late_data(mut self, tag: OutputTag<Keyed<K, T>>) -> Self {
        self.late_data = Some(tag);
        self
    }

    /// Aggregates each window incrementally with `aggregate` and emits
    /// `window_fn(key, window, result)` when it fires.
    pub fn aggregate<A, F, R>(
        self,
        aggregate: A,
        window_fn: F,
    ) -> KeyedOperatorStream<K, T, impl Fn() -> WindowOperator<K, A, W, F> + Send + Sync + 'static>
    where
        A: AggregateFunction<In = T> + Clone,
        A::Acc: Clone,
        F: Fn(&K, TimeWindow, A::Out) -> R + Clone + Send + Sync + 'static,
        R: 'static,
    {
        let WindowedStream { keyed, uid, assigner, lateness, late_data } = self;
        keyed.input(uid).operator(uid, move || {
            let op = WindowOperator::new(uid, assigner.clone(), aggregate.clone(), window_fn.clone(), lateness);
            match late_data {
                Some(tag) => op.with_late_data(tag),
                None => op,
            }
        })
    }

    /// Reduces each window with `f` and emits `(key, window, reduced)`.
    pub fn reduce<F>(
        self,
        f: F,
    ) -> KeyedOperatorStream<K, T, impl Fn() -> ReduceWindow<K, T, W, F> + Send + Sync + 'static>
    where
        T: StateValue,
        F: Fn(T, T) -> T + Clone + Send + Sync + 'static,
    {
        let labelled: Labelled<K, T> = |k, w, v| (k.clone(), w, v);
        self.aggregate(Reduce::new(f), labelled)
    }
}

/// Two keyed streams connected for a two-input operator.
pub struct ConnectedStreams<K, A, B> {
    job: Job,
    conns: Vec<ConnectionId>,
    _t: PhantomData<fn(K, A, B)>,
}

/// The operator behind [`ConnectedStreams::window_join`].
pub type WindowJoinOperator<K, A, B, J> = KeyedCoProcessOperator<WindowJoin<K, A, B, J>>;

/// The operator behind [`ConnectedStreams::interval_join`].
pub type IntervalJoinOperator<K, A, B, J> = KeyedCoProcessOperator<IntervalJoin<K, A, B, J>>;

/// The stream after a two-input operator.
pub type CoOperatorStream<K, A, B, F> = Stream<CoInput<K, A, B>, OperatorSpec<Identity, F>>;

impl<K, A, B> ConnectedStreams<K, A, B>
where
    K: KeyEncode + StateValue + Clone + Send + 'static,
    A: Send + 'static,
    B: Send + 'static,
{
    fn input(self, uid: &'static str) -> Stream<CoInput<K, A, B>, Identity> {
        let input: Box<dyn StageInput<CoInput<K, A, B>>> = Box::new(ExchangeInput::new(uid, self.conns));
        Stream::new(self.job, input)
    }

    /// Runs a keyed co-process function over both inputs (shared keyed state and timers).
    pub fn process<F, P>(
        self,
        uid: &'static str,
        factory: F,
    ) -> CoOperatorStream<K, A, B, impl Fn() -> KeyedCoProcessOperator<P> + Send + Sync + 'static>
    where
        F: Fn() -> P + Send + Sync + 'static,
        P: KeyedCoProcessFunction<Key = K, In1 = A, In2 = B>,
    {
        self.input(uid).operator(uid, move || KeyedCoProcessOperator::new(factory()))
    }

    /// Pairs records of both inputs with the same key in the same event-time window
    /// (`slide_ms == size_ms`: tumbling), emitting `f(key, a, b)` when the window completes.
    pub fn window_join<R, J>(
        self,
        uid: &'static str,
        size_ms: i64,
        slide_ms: i64,
        f: J,
    ) -> CoOperatorStream<K, A, B, impl Fn() -> WindowJoinOperator<K, A, B, J> + Send + Sync + 'static>
    where
        A: StateValue + Clone,
        B: StateValue + Clone,
        J: Fn(&K, &A, &B) -> R + Clone + Send + Sync + 'static,
        R: 'static,
    {
        self.process(uid, move || WindowJoin::new(uid, size_ms, slide_ms, f.clone()))
    }

    /// Pairs each record `a` of the first input with every record `b` of the second input of
    /// the same key whose time lies in `[t_a + lower_ms, t_a + upper_ms]`, emitting
    /// `f(key, a, b)`.
    pub fn interval_join<R, J>(
        self,
        uid: &'static str,
        lower_ms: i64,
        upper_ms: i64,
        f: J,
    ) -> CoOperatorStream<K, A, B, impl Fn() -> IntervalJoinOperator<K, A, B, J> + Send + Sync + 'static>
    where
        A: StateValue + Clone,
        B: StateValue + Clone,
        (i64, A): StateValue,
        (i64, B): StateValue,
        J: Fn(&K, &A, &B) -> R + Clone + Send + Sync + 'static,
        R: 'static,
    {
        self.process(uid, move || IntervalJoin::new(uid, lower_ms, upper_ms, f.clone()))
    }
}

/// The stream after a keyed operator: its stage reads [`Keyed`] records, `F` makes the operator.
pub type KeyedOperatorStream<K, T, F> = Stream<Keyed<K, T>, OperatorSpec<Identity, F>>;

use weir_operators::coprocess::{CoInput, KeyedCoProcessFunction, KeyedCoProcessOperator};
use weir_operators::join::{IntervalJoin, WindowJoin};

/// A stream partitioned by key: what keyed state, timers and windows work on. The upstream
/// stage stays open until a consumer decides what crosses the exchange.
pub struct KeyedStream<K, T, In: 'static, C, F> {
    upstream: Stream<In, C>,
    uid: &'static str,
    key: F,
    _t: PhantomData<fn(K, T)>,
}

fn keep_keyed<K, T>(k: Keyed<K, T>) -> Keyed<K, T> {
    k
}

impl<K, T, In, C, KF> KeyedStream<K, T, In, C, KF>
where
    K: KeyEncode + Clone + Send + 'static,
    T: Send + 'static,
    In: 'static,
    C: ChainSpec<In, Out = T>,
    KF: Fn(&T) -> K + Clone + Send + Sync + 'static,
{
    /// Closes the upstream stage into a keyed exchange whose records travel as `wrap(keyed)`.
    fn close_keyed<E: Send + 'static, W>(self, conn: ConnectionId, wrap: W) -> Job
    where
        W: Fn(Keyed<K, T>) -> E + Clone + Send + Sync + 'static,
    {
        let KeyedStream { upstream, uid, key, .. } = self;
        upstream.close(Partitioner::by_key(uid, key, wrap), Some(conn), false)
    }

    fn input(self, uid: &'static str) -> Stream<Keyed<K, T>, Identity> {
        let conn = self.upstream.job.graph.borrow_mut().connection::<Keyed<K, T>>(false);
        let job = self.close_keyed(conn, keep_keyed::<K, T> as fn(Keyed<K, T>) -> Keyed<K, T>);
        let input: Box<dyn StageInput<Keyed<K, T>>> = Box::new(ExchangeInput::new(uid, vec![conn]));
        Stream::new(job, input)
    }

    /// Connects this keyed stream with `other` (keyed by the same key type): both meet, per
    /// key, in one two-input operator ([`ConnectedStreams::process`], or a join).
    pub fn connect<B, In2, C2, F2>(self, other: KeyedStream<K, B, In2, C2, F2>) -> ConnectedStreams<K, T, B>
    where
        B: Send + 'static,
        In2: 'static,
        C2: ChainSpec<In2, Out = B>,
        F2: Fn(&B) -> K + Clone + Send + Sync + 'static,
    {
        let (a, b) = {
            let mut graph = self.upstream.job.graph.borrow_mut();
            (graph.connection::<CoInput<K, T, B>>(false), graph.connection::<CoInput<K, T, B>>(false))
        };
        let first: fn(Keyed<K, T>) -> CoInput<K, T, B> = CoInput::First;
        let second: fn(Keyed<K, B>) -> CoInput<K, T, B> = CoInput::Second;
        let job = self.close_keyed(a, first);
        other.close_keyed(b, second);
        ConnectedStreams { job, conns: vec![a, b], _t: PhantomData }
    }

    /// Runs a keyed process function (state and timers per key); `factory` makes one per shard.
    pub fn process<F, P>(
        self,
        uid: &'static str,
        factory: F,
    ) -> KeyedOperatorStream<K, T, impl Fn() -> KeyedProcessOperator<P> + Send + Sync + 'static>
    where
        F: Fn() -> P + Send + Sync + 'static,
        P: KeyedProcessFunction<Key = K, In = T>,
        K: StateValue,
    {
        self.input(uid).operator(uid, move || KeyedProcessOperator::new(factory()))
    }

    /// A rolling reduce per key: the accumulator starts at `init(key)` and every record folds
    /// into it; each update is emitted (Flink's `reduce`/`sum` on a keyed stream).
    pub fn reduce<A, I, R>(
        self,
        uid: &'static str,
        init: I,
        fold: R,
    ) -> KeyedOperatorStream<K, T, impl Fn() -> ReduceOperator<K, T, A, I, R> + Send + Sync + 'static>
    where
        K: StateValue,
        A: StateValue + Clone,
        I: Fn(&K) -> A + Clone + Send + Sync + 'static,
        R: Fn(A, T) -> A + Clone + Send + Sync + 'static,
    {
        self.input(uid).operator(uid, move || ReduceOperator::new(init.clone(), fold.clone()))
    }

    /// Windows of this keyed stream, assigned by `assigner` (tumbling, sliding, session, in
    /// event or processing time); finish with [`WindowedStream::aggregate`] or
    /// [`WindowedStream::reduce`].
    pub fn window<W>(self, uid: &'static str, assigner: W) -> WindowedStream<K, T, In, C, KF, W>
    where
        W: WindowAssigner<Window = TimeWindow> + Clone + Send + Sync + 'static,
    {
        WindowedStream { keyed: self, uid, assigner, lateness: AllowedLateness::ZERO, late_data: None }
    }

    /// Global windows of `size` records per key (a count trigger that fires and purges).
    pub fn count_window<A, F, R>(
        self,
        uid: &'static str,
        size: u64,
        aggregate: A,
        window_fn: F,
    ) -> KeyedOperatorStream<K, T, impl Fn() -> CountWindowOperator<K, A, F> + Send + Sync + 'static>
    where
        A: AggregateFunction<In = T> + Clone,
        (u64, A::Acc): StateValue,
        F: Fn(&K, A::Out) -> R + Clone + Send + Sync + 'static,
        R: 'static,
    {
        self.input(uid).operator(uid, move || CountWindowOperator::new(size, aggregate.clone(), window_fn.clone()))
    }

    /// The keyed stream's records as a plain stream of [`Keyed`] (key and value).
    pub fn into_stream(self, uid: &'static str) -> Stream<Keyed<K, T>, Identity> {
        self.upstream.job.graph.borrow_mut().claim_uid(uid);
        self.input(uid)
    }
}
