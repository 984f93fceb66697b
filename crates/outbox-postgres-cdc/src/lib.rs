//! PostgreSQL CDC source of the outbox relay: reads outbox inserts from a logical
//! replication slot (`pgoutput`, on a publication for the outbox table only) over the
//! streaming replication protocol, through `pgwire-replication`.
//!
//! - [`slot`]: the publication and the slot (create, inspect).
//! - [`checkpoint`]: the relay's durable position, to recover from a vanished slot.
//! - [`pgoutput`]: the decoder of pgoutput's messages.
//! - [`standby`]: what the synchronous standbys have flushed, which a batch waits for.
//! - [`stream`]: [`CdcStream`], which turns the replication stream into [`CdcEvent`]s:
//!   outbox rows in commit order, commit boundaries with their LSNs, idle positions.
//!
//! The consumer confirms a position with [`CdcStream::confirm`] only once every event
//! before it was acknowledged by the broker; Postgres resends everything after the
//! confirmed position when the stream restarts, so a crash causes duplicates, never loss.

pub mod checkpoint;
pub mod pgoutput;
pub mod slot;
pub mod standby;
pub mod stream;

pub use pgwire_replication::Lsn;
pub use slot::{CdcNames, SlotStatus};
pub use stream::{CdcError, CdcEvent, CdcStream};
