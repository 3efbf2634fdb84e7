//! The I/O-free half of alarm delivery: which packet id carries which outbox
//! row on the current connection, how many alarms await their PUBACK, and where
//! in the outbox to read next. Its methods only change state and say what to do
//! ([`Action`], [`NextRows`], [`Lost`]); the sender task publishes, deletes
//! and dead-letters rows. The tests feed it the events rumqttc reports,
//! without a network.
//!
//! # A row the broker refuses
//! MQTT 3.1.1 §3.3.5 lets a broker close the connection on a publish it does
//! not authorize (EMQX, HiveMQ and AWS IoT do). That row is the oldest
//! unacknowledged one, so it would be sent first again on every reconnect
//! and block every later alarm. Each lost connection therefore counts a
//! *strike* against the oldest alarm sent and not acknowledged on it; a row
//! with a strike is from then on sent alone (nothing after it until its
//! PUBACK), so that later strikes can only be its own; at `max_closes`
//! strikes it is dead-lettered and the rest flows. An ordinary outage costs a
//! row at most one strike (connect attempts that never get a CONNACK count
//! none), and a PUBACK clears it.

use std::collections::{BTreeSet, HashMap, VecDeque};

use rumqttc::{Event, Outgoing, Packet};

/// What a publish handed to rumqttc is, so that the packet id rumqttc reports
/// for it (`Outgoing::Publish(pkid)`) can be matched to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    /// The outbox row with this id.
    Alarm(i64),
    /// The retained `offline` of a clean stop, whose PUBACK the stop waits for.
    Offline,
    /// Anything else: nobody waits for its acknowledgement.
    Other,
}

/// What the sender task has to do after an event.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Nothing,
    /// The broker has this outbox row: delete it. The window has room for one
    /// more alarm.
    DeleteRow(i64),
}

/// What a lost connection means for the outbox.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lost {
    /// It was the current connection (false: a connect attempt that never came up).
    pub current: bool,
    /// This row reached the strike limit: move it to the dead-letter table.
    pub dead_letter: Option<(i64, u32)>,
}

/// The outbox rows to send next: ids above `after`, oldest first, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NextRows {
    pub after: i64,
    pub limit: usize,
}

/// Alarm delivery across connections.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// Alarms awaiting their PUBACK at once (`alarm_inflight`). It bounds what
    /// a reconnect sends again in one go, and leaves rumqttc's in-flight slots
    /// (window + 64) to the retained state that follows a reconnect.
    window: usize,
    /// None while there is no connection.
    conn: Option<Numbering>,
    /// Row → connections lost while it was the oldest alarm awaiting its PUBACK.
    strikes: HashMap<i64, u32>,
    /// Strikes after which a row is dead-lettered (`dead_letter_after_closes`).
    max_closes: u32,
}

/// Rows with strikes kept track of at most (a row pruned by the outbox's
/// bounds leaves its entry behind; this keeps those few from adding up).
const MAX_STRIKE_ROWS: usize = 1024;

/// One connection's bookkeeping. A new connection starts afresh: it is a new
/// rumqttc client (clean session) that numbers from 1 again, and every row not
/// acknowledged on the old one is sent again.
#[derive(Debug)]
struct Numbering {
    gen: u64,
    /// Publishes handed to rumqttc whose packet id we have not seen yet, in
    /// the order rumqttc takes them from its request queue.
    unnumbered: VecDeque<Tag>,
    /// A publish rumqttc parked on a packet-id collision (its id still held by
    /// an unacknowledged one); rumqttc sends it when that id's PUBACK comes.
    collided: Option<(u16, Tag)>,
    /// The parked publish, reported sent *before* the PUBACK that freed its id
    /// (rumqttc up to 0.24): mapped only once that PUBACK is handled.
    resent: Option<(u16, Tag)>,
    /// The parked publish, mapped at the PUBACK that freed its id (rumqttc
    /// 0.25 reports that PUBACK first): the `Outgoing::Publish` that follows
    /// is its own, not the next queued request's.
    renumbered: Option<u16>,
    /// Packet id → outbox row, for alarms awaiting their PUBACK.
    awaiting_ack: HashMap<u16, i64>,
    /// Rows handed to rumqttc on this connection and not acknowledged.
    in_flight: BTreeSet<i64>,
    /// Highest outbox row sent on this connection.
    last_sent: i64,
    offline_pkid: Option<u16>,
    offline_acked: bool,
}

impl Delivery {
    pub(crate) fn new(window: usize, max_closes: u32) -> Self {
        Delivery { window: window.max(1), conn: None, strikes: HashMap::new(), max_closes: max_closes.max(1) }
    }

    /// Connection `gen` is up (CONNACK). The old numbering is forgotten, and
    /// the outbox is read again from its oldest row.
    pub(crate) fn connected(&mut self, gen: u64) {
        self.conn = Some(Numbering {
            gen,
            unnumbered: VecDeque::new(),
            collided: None,
            resent: None,
            renumbered: None,
            awaiting_ack: HashMap::new(),
            in_flight: BTreeSet::new(),
            last_sent: 0,
            offline_pkid: None,
            offline_acked: false,
        });
    }

    /// Connection `gen` failed. The oldest alarm sent on it and not
    /// acknowledged gets a strike (see the module doc).
    pub(crate) fn disconnected(&mut self, gen: u64) -> Lost {
        let current = self.conn.as_ref().is_some_and(|c| c.gen == gen);
        if !current {
            return Lost { current, dead_letter: None };
        }
        let oldest = self.conn.take().and_then(|c| c.awaiting_ack.values().min().copied());
        let Some(row) = oldest else { return Lost { current, dead_letter: None } };
        if self.strikes.len() >= MAX_STRIKE_ROWS && !self.strikes.contains_key(&row) {
            self.strikes.clear();
        }
        let n = self.strikes.entry(row).or_insert(0);
        *n += 1;
        let n = *n;
        if n >= self.max_closes {
            self.strikes.remove(&row);
            return Lost { current, dead_letter: Some((row, n)) };
        }
        Lost { current, dead_letter: None }
    }

    /// Whether `row` may be handed to rumqttc now: a row with strikes goes
    /// only when nothing else is in flight, and nothing goes after it until
    /// its PUBACK.
    pub(crate) fn admit(&self, row: i64) -> bool {
        let Some(c) = self.conn.as_ref() else { return false };
        if c.in_flight.iter().any(|r| self.strikes.contains_key(r)) {
            return false;
        }
        !self.strikes.contains_key(&row) || c.in_flight.is_empty()
    }

    /// rumqttc accepted a publish into its request queue.
    pub(crate) fn queued(&mut self, tag: Tag) {
        let Some(c) = self.conn.as_mut() else { return };
        c.unnumbered.push_back(tag);
        if let Tag::Alarm(row) = tag {
            c.last_sent = row;
            c.in_flight.insert(row);
        }
    }

    /// Which outbox rows to send now; None without a connection or with the
    /// window full.
    pub(crate) fn next_rows(&self) -> Option<NextRows> {
        let c = self.conn.as_ref()?;
        if c.in_flight.iter().any(|r| self.strikes.contains_key(r)) {
            // A row with strikes travels alone.
            return None;
        }
        let limit = self.window.saturating_sub(c.in_flight.len());
        (limit > 0).then_some(NextRows { after: c.last_sent, limit })
    }

    /// An event of connection `gen`, as rumqttc's event loop reported it.
    /// Events of any other connection change nothing.
    pub(crate) fn on_event(&mut self, gen: u64, event: &Event) -> Action {
        let Some(c) = self.conn.as_mut().filter(|c| c.gen == gen) else { return Action::Nothing };
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => c.sent(*pkid),
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                if let Some(tag) = c.unnumbered.pop_front() {
                    c.collided = Some((*pkid, tag));
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let action = c.acked(ack.pkid);
                if let Action::DeleteRow(row) = action {
                    self.strikes.remove(&row);
                }
                return action;
            }
            _ => {}
        }
        Action::Nothing
    }

    /// Whether `gen` is the connection in use.
    pub(crate) fn is_current(&self, gen: u64) -> bool {
        self.conn.as_ref().is_some_and(|c| c.gen == gen)
    }

    /// Whether a clean stop may disconnect: `offline` and every alarm sent
    /// are acknowledged (or there is no connection left to wait on).
    pub(crate) fn drained(&self) -> bool {
        self.conn.as_ref().is_none_or(|c| c.offline_acked && c.in_flight.is_empty())
    }

    #[cfg(test)]
    pub(crate) fn alarms_in_flight(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.in_flight.len())
    }

    #[cfg(test)]
    pub(crate) fn last_sent(&self) -> i64 {
        self.conn.as_ref().map_or(0, |c| c.last_sent)
    }
}

impl Numbering {
    /// rumqttc sent a publish with packet id `pkid` (0 for QoS 0).
    fn sent(&mut self, pkid: u16) {
        if self.renumbered.take_if(|p| *p == pkid).is_some() {
            return;
        }
        match self.collided.take() {
            Some((p, tag)) if p == pkid => self.resent = Some((pkid, tag)),
            other => {
                self.collided = other;
                match self.unnumbered.pop_front() {
                    Some(tag) => self.number(pkid, tag),
                    None => tracing::debug!(pkid, "publish event without a matching request"),
                }
            }
        }
    }

    fn acked(&mut self, pkid: u16) -> Action {
        if self.offline_pkid == Some(pkid) {
            self.offline_acked = true;
        }
        // The old holder of `pkid` first: the parked publish takes it over.
        let acked = self.awaiting_ack.remove(&pkid);
        if let Some((pkid, tag)) = self.resent.take_if(|(p, _)| *p == pkid) {
            self.number(pkid, tag);
        } else if let Some((pkid, tag)) = self.collided.take_if(|(p, _)| *p == pkid) {
            self.number(pkid, tag);
            self.renumbered = Some(pkid);
        }
        match acked {
            Some(row) => {
                self.in_flight.remove(&row);
                Action::DeleteRow(row)
            }
            None => Action::Nothing,
        }
    }

    /// `tag`'s publish went out with packet id `pkid`.
    fn number(&mut self, pkid: u16, tag: Tag) {
        match tag {
            Tag::Alarm(row) => {
                self.awaiting_ack.insert(pkid, row);
            }
            Tag::Offline => self.offline_pkid = Some(pkid),
            Tag::Other => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rumqttc::{MqttState, PubAck, Publish, QoS, Request};

    use super::*;

    fn out(pkid: u16) -> Event {
        Event::Outgoing(Outgoing::Publish(pkid))
    }

    fn parked(pkid: u16) -> Event {
        Event::Outgoing(Outgoing::AwaitAck(pkid))
    }

    fn ack(pkid: u16) -> Event {
        Event::Incoming(Packet::PubAck(PubAck::new(pkid)))
    }

    /// Queues outbox rows while the window has room, as the sender task does;
    /// returns the rows queued, in order.
    fn pump(d: &mut Delivery, outbox: &BTreeSet<i64>) -> Vec<i64> {
        let mut sent = Vec::new();
        while let Some(next) = d.next_rows() {
            let rows: Vec<i64> = outbox.range(next.after + 1..).take(next.limit).copied().collect();
            if rows.is_empty() {
                break;
            }
            for row in rows {
                if !d.admit(row) {
                    return sent;
                }
                d.queued(Tag::Alarm(row));
                sent.push(row);
            }
        }
        sent
    }

    /// Feeds `events` of connection `gen`, deleting rows from `outbox` as
    /// told; returns the rows deleted, in order.
    fn feed(d: &mut Delivery, gen: u64, outbox: &mut BTreeSet<i64>, events: &[Event]) -> Vec<i64> {
        let mut deleted = Vec::new();
        for ev in events {
            if let Action::DeleteRow(row) = d.on_event(gen, ev) {
                assert!(outbox.remove(&row), "row {row} deleted twice");
                deleted.push(row);
            }
        }
        deleted
    }

    /// Hands a publish of `row` to rumqttc's own state machine (what its
    /// event loop does with a request); returns the events it reports.
    fn rumqttc_sends(mqtt: &mut MqttState, d: &mut Delivery, row: i64) -> Vec<Event> {
        d.queued(Tag::Alarm(row));
        mqtt.handle_outgoing_packet(Request::Publish(Publish::new("a", QoS::AtLeastOnce, "{}"))).unwrap();
        mqtt.events.drain(..).collect()
    }

    /// A PUBACK through rumqttc's own state machine; returns the events it reports.
    fn rumqttc_receives_puback(mqtt: &mut MqttState, pkid: u16) -> Vec<Event> {
        mqtt.handle_incoming_packet(Packet::PubAck(PubAck::new(pkid))).unwrap();
        mqtt.events.drain(..).collect()
    }

    /// rumqttc's own state machine (no network) says which events come in
    /// which order; the collision order is the one rumqttc 0.25 changed.
    #[test]
    fn rumqttc_s_own_collision_events_delete_each_row_on_its_own_puback() {
        // Packet ids 1..=3, so that the fourth publish collides.
        let mut mqtt = MqttState::new(3, false);
        let mut d = Delivery::new(10, 5);
        d.connected(1);
        let mut outbox: BTreeSet<i64> = [10, 11, 12, 13].into();
        for row in [10, 11, 12] {
            let evs = rumqttc_sends(&mut mqtt, &mut d, row);
            assert!(feed(&mut d, 1, &mut outbox, &evs).is_empty());
        }
        let evs = rumqttc_receives_puback(&mut mqtt, 2); // out of order: row 11
        assert_eq!(feed(&mut d, 1, &mut outbox, &evs), [11]);
        // Row 13 gets packet id 1 again, still held by row 10: parked.
        let evs = rumqttc_sends(&mut mqtt, &mut d, 13);
        assert_eq!(evs, [parked(1)], "rumqttc parks a colliding publish");
        assert!(feed(&mut d, 1, &mut outbox, &evs).is_empty());
        // Row 10's PUBACK; rumqttc sends row 13 with id 1 now.
        let evs = rumqttc_receives_puback(&mut mqtt, 1);
        assert_eq!(evs, [ack(1), out(1)], "rumqttc 0.25's order: the PUBACK, then the parked publish");
        assert_eq!(feed(&mut d, 1, &mut outbox, &evs), [10], "that PUBACK was row 10's, not row 13's");
        let evs = rumqttc_receives_puback(&mut mqtt, 1);
        assert_eq!(feed(&mut d, 1, &mut outbox, &evs), [13], "row 13's own PUBACK");
        let evs = rumqttc_receives_puback(&mut mqtt, 3);
        assert_eq!(feed(&mut d, 1, &mut outbox, &evs), [12]);
        assert!(outbox.is_empty());
        assert_eq!(d.alarms_in_flight(), 0, "no slot of the window lost to the collision");
    }

    /// The same collision in rumqttc 0.24's order (the parked publish reported
    /// before the PUBACK that freed its id), fed by hand.
    #[test]
    fn a_puback_deletes_its_own_row_even_when_rumqttc_reuses_the_pkid() {
        let mut d = Delivery::new(10, 5);
        d.connected(1);
        let mut outbox: BTreeSet<i64> = [11, 12, 13].into();
        d.queued(Tag::Other); // `online`
        assert_eq!(pump(&mut d, &outbox), [11, 12, 13]);
        // `online` is 1, rows 11 and 12 are 2 and 3; row 13 collides on 2,
        // still held by row 11 (the broker acks out of order).
        assert!(feed(&mut d, 1, &mut outbox, &[out(1), out(2), out(3), parked(2)]).is_empty());
        assert_eq!(feed(&mut d, 1, &mut outbox, &[ack(3)]), [12]);
        // rumqttc sends the parked publish, then reports the PUBACK that freed id 2.
        assert_eq!(feed(&mut d, 1, &mut outbox, &[out(2), ack(2)]), [11], "that PUBACK was row 11's, not row 13's");
        assert_eq!(d.alarms_in_flight(), 1);
        assert_eq!(feed(&mut d, 1, &mut outbox, &[ack(2)]), [13]);
        assert!(feed(&mut d, 1, &mut outbox, &[ack(1)]).is_empty(), "`online` is no row");
        assert!(outbox.is_empty());
        assert_eq!(d.alarms_in_flight(), 0);
    }

    #[test]
    fn the_window_limits_alarms_in_flight() {
        let mut d = Delivery::new(2, 5);
        assert_eq!(d.next_rows(), None, "nothing is sent without a connection");
        d.connected(1);
        let mut outbox: BTreeSet<i64> = (1..=5).collect();
        assert_eq!(pump(&mut d, &outbox), [1, 2]);
        assert_eq!(d.next_rows(), None, "window of 2 full");
        assert!(feed(&mut d, 1, &mut outbox, &[out(1), out(2)]).is_empty());
        assert_eq!(d.next_rows(), None, "sent is not acknowledged");
        assert_eq!(feed(&mut d, 1, &mut outbox, &[ack(1)]), [1]);
        assert_eq!(d.next_rows(), Some(NextRows { after: 2, limit: 1 }), "an ack opens one slot");
        assert_eq!(pump(&mut d, &outbox), [3]);
        assert_eq!(d.alarms_in_flight(), 2);
    }

    #[test]
    fn a_reconnect_resends_unacked_rows_in_order() {
        let mut d = Delivery::new(3, 5);
        d.connected(1);
        let mut outbox: BTreeSet<i64> = (1..=5).collect();
        assert_eq!(pump(&mut d, &outbox), [1, 2, 3]);
        assert_eq!(feed(&mut d, 1, &mut outbox, &[out(1), out(2), out(3), ack(2)]), [2]);
        assert_eq!(pump(&mut d, &outbox), [4]);
        assert!(d.disconnected(1).current);
        assert_eq!(d.next_rows(), None);
        d.connected(2);
        assert_eq!(d.alarms_in_flight(), 0, "nothing is in flight on a new connection");
        // Row 1 was the oldest unacked at the loss: one strike, so it goes alone.
        assert_eq!(pump(&mut d, &outbox), [1], "the oldest unacked row first, alone");
        assert_eq!(feed(&mut d, 2, &mut outbox, &[out(1), ack(1)]), [1]);
        assert_eq!(pump(&mut d, &outbox), [3, 4, 5], "its PUBACK clears the strike: the window again");
        assert_eq!(feed(&mut d, 2, &mut outbox, &[out(2), out(3), out(4), ack(2), ack(3), ack(4)]), [3, 4, 5]);
        assert!(outbox.is_empty());
    }

    /// A broker that closes the connection on one row's publish (MQTT 3.1.1
    /// §3.3.5): after `max_closes` losses with it oldest in flight, it is
    /// dead-lettered, and only it; the rows behind it then flow.
    #[test]
    fn a_row_the_broker_closes_on_is_dead_lettered_alone_after_max_closes() {
        let mut d = Delivery::new(4, 3);
        let mut outbox: BTreeSet<i64> = (1..=6).collect();
        let mut gen = 0;
        // Rows 1 and 2 are fine, row 3 is refused: the broker acks 1 and 2, then closes.
        gen += 1;
        d.connected(gen);
        assert_eq!(pump(&mut d, &outbox), [1, 2, 3, 4]);
        assert_eq!(feed(&mut d, gen, &mut outbox, &[out(1), out(2), out(3), out(4), ack(1), ack(2)]), [1, 2]);
        assert_eq!(d.disconnected(gen), Lost { current: true, dead_letter: None }, "strike 1 for row 3");
        for strike in 2..=3 {
            gen += 1;
            d.connected(gen);
            assert_eq!(pump(&mut d, &outbox), [3], "row 3 travels alone once it has a strike");
            assert_eq!(d.next_rows(), None, "nothing after it while it is in flight");
            assert!(feed(&mut d, gen, &mut outbox, &[out(1)]).is_empty());
            // A connect attempt that never came up counts nothing.
            assert_eq!(d.disconnected(gen + 100), Lost { current: false, dead_letter: None });
            let lost = d.disconnected(gen);
            let want = (strike == 3).then_some((3, 3));
            assert_eq!(lost, Lost { current: true, dead_letter: want }, "strike {strike}");
        }
        outbox.remove(&3); // the sender task moves it to the dead-letter table
        gen += 1;
        d.connected(gen);
        assert_eq!(pump(&mut d, &outbox), [4, 5, 6], "the rest flows, a full window again");
        assert_eq!(feed(&mut d, gen, &mut outbox, &[out(1), out(2), out(3), ack(1), ack(2), ack(3)]), [4, 5, 6]);
    }

    #[test]
    fn an_outage_costs_one_strike_that_a_puback_clears() {
        let mut d = Delivery::new(4, 2);
        let mut outbox: BTreeSet<i64> = (1..=3).collect();
        d.connected(1);
        assert_eq!(pump(&mut d, &outbox), [1, 2, 3]);
        assert!(feed(&mut d, 1, &mut outbox, &[out(1), out(2)]).is_empty());
        assert_eq!(d.disconnected(1).dead_letter, None);
        d.connected(2);
        assert_eq!(pump(&mut d, &outbox), [1]);
        assert_eq!(feed(&mut d, 2, &mut outbox, &[out(1), ack(1)]), [1]);
        assert_eq!(pump(&mut d, &outbox), [2, 3]);
        assert!(feed(&mut d, 2, &mut outbox, &[out(2), out(3)]).is_empty());
        // Row 1's strike is gone with it; row 2 gets its first one here.
        assert_eq!(d.disconnected(2).dead_letter, None, "a second outage dead-letters nothing");
        d.connected(3);
        assert_eq!(pump(&mut d, &outbox), [2]);
        // Lost with nothing sent yet (only queued): no strike.
        assert_eq!(d.disconnected(3).dead_letter, None);
        d.connected(4);
        assert_eq!(pump(&mut d, &outbox), [2]);
        assert_eq!(feed(&mut d, 4, &mut outbox, &[out(1), ack(1)]), [2]);
    }

    #[test]
    fn a_puback_for_an_unknown_or_stale_pkid_changes_nothing() {
        let mut d = Delivery::new(2, 5);
        d.connected(1);
        let mut outbox: BTreeSet<i64> = (1..=3).collect();
        d.queued(Tag::Other); // QoS 1 retained state: pkid 1
        assert_eq!(pump(&mut d, &outbox), [1, 2]);
        d.queued(Tag::Other); // a QoS 0 score: pkid 0
        assert!(feed(&mut d, 1, &mut outbox, &[out(1), out(2), out(3), out(0)]).is_empty());
        let before = (d.alarms_in_flight(), d.next_rows());
        assert!(feed(&mut d, 1, &mut outbox, &[ack(9), ack(0), ack(1)]).is_empty(), "unknown, QoS 0, non-alarm");
        assert_eq!((d.alarms_in_flight(), d.next_rows()), before);
        assert_eq!(feed(&mut d, 1, &mut outbox, &[ack(2)]), [1]);
        assert!(feed(&mut d, 1, &mut outbox, &[ack(2)]).is_empty(), "a second PUBACK for the same id");
        assert_eq!(d.alarms_in_flight(), 1, "a stale PUBACK does not open the window");
        assert!(!d.drained());
    }

    #[test]
    fn a_new_connection_forgets_the_old_numbering() {
        let mut d = Delivery::new(10, 5);
        d.connected(1);
        let mut outbox: BTreeSet<i64> = [7, 8].into();
        assert_eq!(pump(&mut d, &outbox), [7, 8]);
        assert!(feed(&mut d, 1, &mut outbox, &[out(1), out(2)]).is_empty());
        d.connected(2);
        d.queued(Tag::Other); // `online`, now pkid 1
        assert_eq!(pump(&mut d, &outbox), [7, 8], "sent again, as 2 and 3");
        assert!(feed(&mut d, 2, &mut outbox, &[out(1), out(2), out(3)]).is_empty());
        // Events of connection 1 still in the channel must not touch
        // connection 2's numbering: pkid 2 was row 8 there and is row 7 here.
        assert!(feed(&mut d, 1, &mut outbox, &[out(4), ack(1), ack(2), ack(3)]).is_empty(), "events of connection 1");
        assert_eq!(d.alarms_in_flight(), 2);
        assert!(!d.disconnected(1).current, "connection 1's error does not end connection 2");
        assert!(feed(&mut d, 2, &mut outbox, &[ack(1)]).is_empty(), "pkid 1 is `online` now, no longer row 7");
        assert_eq!(feed(&mut d, 2, &mut outbox, &[ack(3), ack(2)]), [8, 7]);
        assert_eq!(d.alarms_in_flight(), 0);
    }

    #[test]
    fn a_clean_stop_waits_for_offline_and_the_alarms_in_flight() {
        let mut d = Delivery::new(10, 5);
        assert!(d.drained(), "no connection: nothing to wait for");
        d.connected(1);
        let mut outbox: BTreeSet<i64> = [1].into();
        assert_eq!(pump(&mut d, &outbox), [1]);
        d.queued(Tag::Offline);
        assert!(feed(&mut d, 1, &mut outbox, &[out(1), out(2)]).is_empty());
        assert!(!d.drained());
        assert!(feed(&mut d, 1, &mut outbox, &[ack(2)]).is_empty());
        assert!(!d.drained(), "`offline` acknowledged, the alarm not yet");
        assert_eq!(feed(&mut d, 1, &mut outbox, &[ack(1)]), [1]);
        assert!(d.drained());
    }
}
