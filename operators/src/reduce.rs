//! A rolling reduce per key: Flink's `reduce` / `sum` on a keyed stream.

use std::marker::PhantomData;

use weir_state::keygroup::{KeyEncode, key_group_of_encoded};
use weir_state::states::{StateValue, ValueState};
use weir_state::store::Key;

use crate::error::Result;
use crate::operator::{Collector, Keyed, Operator, OperatorContext, Timestamp};

/// Folds each record into its key's accumulator (kept in a [`ValueState`]) and emits the
/// updated accumulator.
pub struct ReduceOperator<K, T, A, I, R> {
    init: I,
    fold: R,
    state: Option<ValueState<A>>,
    max_parallelism: u16,
    key_buf: Vec<u8>,
    _t: PhantomData<fn(K, T)>,
}

impl<K, T, A, I, R> std::fmt::Debug for ReduceOperator<K, T, A, I, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReduceOperator")
    }
}

impl<K, T, A, I, R> ReduceOperator<K, T, A, I, R> {
    /// Accumulators start at `init(key)`; `fold(acc, record)` gives the next one.
    pub fn new(init: I, fold: R) -> Self {
        ReduceOperator { init, fold, state: None, max_parallelism: 0, key_buf: Vec::new(), _t: PhantomData }
    }
}

impl<K, T, A, I, R> Operator for ReduceOperator<K, T, A, I, R>
where
    K: KeyEncode + 'static,
    T: 'static,
    A: StateValue + Clone,
    I: Fn(&K) -> A + 'static,
    R: Fn(A, T) -> A + 'static,
{
    type In = Keyed<K, T>;
    type Out = A;

    fn open(&mut self, ctx: &mut OperatorContext<'_>) -> Result<()> {
        self.max_parallelism = ctx.max_parallelism;
        self.state = Some(ValueState::register(ctx.store, &ctx.state_name("acc"))?);
        Ok(())
    }

    fn process<C: Collector<A>>(
        &mut self,
        record: Keyed<K, T>,
        ts: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        let Some(state) = self.state else {
            return Err(weir_state::StateError::Misuse("reduce used before open".into()).into());
        };
        self.key_buf.clear();
        record.key.encode_key(&mut self.key_buf);
        let key = Key { group: key_group_of_encoded(&self.key_buf, self.max_parallelism), bytes: &self.key_buf };
        let acc = match state.get_owned(ctx.store, key)? {
            Some(acc) => acc,
            None => (self.init)(&record.key),
        };
        let acc = (self.fold)(acc, record.value);
        state.put(ctx.store, key, &acc)?;
        out.collect(acc, ts);
        Ok(())
    }
}
