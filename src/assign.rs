//! Sticky slot assignment for worker mode: given who owns each slot now and
//! which workers are live, decide who should own it after a rebalance,
//! moving as few slots as possible. A pure function, so that the leader's
//! rebalance (`worker::rebalance`) stays a thin layer of SQL around it.
//!
//! The rules, in order:
//!
//! - A resting slot (released under the failure budget, `released_until`
//!   still ahead) is unassigned and counts for nobody.
//! - Every other slot is shared out fairly: with `S` such slots and `W`
//!   live workers each worker ends with `⌊S/W⌋` or `⌈S/W⌉` of them. The
//!   workers that already hold the most keep the larger shares, so the
//!   fewest slots have to move.
//! - A slot whose owner is live and within its share stays where it is.
//!   Only orphans (unassigned, or owned by a worker that is gone) and a
//!   worker's excess over its share move, each to a worker below its share;
//!   a worker that joins therefore takes only from workers above theirs.
//! - A slot goes preferably to a worker other than the one that released
//!   it (`released_by`). When the releaser is the only worker with room,
//!   the slot goes to another worker and that worker hands one slot of its
//!   own to the releaser: one move more than the minimum, so that a slot
//!   that kept failing on one worker is tried on another.
//!
//! Every slot gets exactly one desired owner, so no slot moves twice in one
//! rebalance; the output depends only on the input (not on the order of
//! `live`), so two leaders in a row agree.

use std::cmp::Reverse;

/// What the leader knows about one slot before a rebalance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SlotState {
    /// The worker the slot is assigned to, if any (it may be gone).
    pub(crate) owner: Option<String>,
    /// The worker that last released the slot after too many failures.
    pub(crate) released_by: Option<String>,
    /// Whether the slot is resting after a release (`released_until` is
    /// still in the future).
    pub(crate) resting: bool,
}

/// The desired owner of every slot, in the order of `slots`, given the
/// live workers (`live`, in any order; duplicates are ignored). `None` for
/// resting slots, and for every slot when no worker is live.
pub(crate) fn assign(slots: &[SlotState], live: &[String]) -> Vec<Option<String>> {
    let mut workers: Vec<&str> = live.iter().map(String::as_str).collect();
    workers.sort_unstable();
    workers.dedup();
    if workers.is_empty() {
        return vec![None; slots.len()];
    }
    let index = |id: Option<&str>| id.and_then(|id| workers.binary_search(&id).ok());
    let w = workers.len();

    // Who keeps what: slots of live owners stay put (for now); the rest of
    // the active slots are orphans.
    let mut held: Vec<Vec<usize>> = vec![Vec::new(); w];
    let mut pool: Vec<usize> = Vec::new();
    let mut active = 0usize;
    for (i, s) in slots.iter().enumerate() {
        if s.resting {
            continue;
        }
        active += 1;
        match index(s.owner.as_deref()) {
            Some(o) => held[o].push(i),
            None => pool.push(i),
        }
    }

    // Fair shares: the larger ones to the workers that hold the most
    // already (fewest moves); among equals, not to a worker that released
    // an orphan (so that the orphan can go elsewhere), then by id.
    let releaser: Vec<bool> = (0..w)
        .map(|o| {
            pool.iter()
                .any(|&i| index(slots[i].released_by.as_deref()) == Some(o))
        })
        .collect();
    let mut order: Vec<usize> = (0..w).collect();
    order.sort_by_key(|&o| (Reverse(held[o].len()), releaser[o], o));
    let mut share = vec![active / w; w];
    for &o in order.iter().take(active % w) {
        share[o] += 1;
    }

    // A worker above its share hands over its excess: the slots last in
    // slot order.
    for o in 0..w {
        while held[o].len() > share[o] {
            if let Some(i) = held[o].pop() {
                pool.push(i);
            }
        }
    }

    // Hand the pool to the workers below their share: first the slots that
    // must avoid their releaser, then the rest, each in slot order, each to
    // the worker with the most room (then by id).
    let avoid = |i: usize| {
        if w > 1 {
            index(slots[i].released_by.as_deref())
        } else {
            None
        }
    };
    pool.sort_by_key(|&i| (avoid(i).is_none(), i));
    let mut desired: Vec<Option<usize>> = vec![None; slots.len()];
    let mut moved = vec![false; slots.len()];
    let mut count: Vec<usize> = held.iter().map(Vec::len).collect();
    for (o, kept) in held.iter().enumerate() {
        for &i in kept {
            desired[i] = Some(o);
        }
    }
    let mut stuck = Vec::new();
    for &i in &pool {
        let x = avoid(i);
        let to = (0..w)
            .filter(|&o| count[o] < share[o] && Some(o) != x)
            .max_by_key(|&o| (share[o] - count[o], Reverse(o)));
        match to {
            Some(o) => {
                desired[i] = Some(o);
                moved[i] = true;
                count[o] += 1;
            }
            // Only its releaser has room: settled below.
            None => stuck.push(i),
        }
    }
    for i in stuck {
        let Some(x) = avoid(i) else { continue };
        // Trade places with a slot another worker holds and that may go to
        // the releaser: preferably one that moves anyway (no extra move),
        // else one the worker kept (one extra move). The last in slot
        // order, for determinism.
        let trade = |moving: bool| {
            (0..slots.len()).rev().find(|&j| {
                moved[j] == moving && matches!(desired[j], Some(o) if o != x) && avoid(j) != Some(x)
            })
        };
        match trade(true).or_else(|| trade(false)) {
            Some(j) => {
                desired[i] = desired[j];
                desired[j] = Some(x);
                moved[i] = true;
                moved[j] = true;
            }
            None => {
                desired[i] = Some(x);
                moved[i] = true;
            }
        }
        count[x] += 1;
    }
    desired
        .into_iter()
        .map(|o| o.map(|o| workers[o].to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    fn owned(owners: &[Option<String>]) -> Vec<SlotState> {
        owners
            .iter()
            .map(|o| SlotState {
                owner: o.clone(),
                ..SlotState::default()
            })
            .collect()
    }

    /// Slots whose owner differs between two assignments.
    fn moves(before: &[Option<String>], after: &[Option<String>]) -> usize {
        before.iter().zip(after).filter(|(a, b)| a != b).count()
    }

    fn loads(owners: &[Option<String>]) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for o in owners.iter().flatten() {
            *m.entry(o.clone()).or_insert(0) += 1;
        }
        m
    }

    /// Every live worker holds ⌊S/W⌋ or ⌈S/W⌉ of the `active` slots, and
    /// nobody else holds any.
    fn assert_fair(owners: &[Option<String>], live: &[String], active: usize) {
        let l = loads(owners);
        let (lo, hi) = (active / live.len(), active.div_ceil(live.len()));
        for id in live {
            let n = l.get(id).copied().unwrap_or(0);
            assert!(
                n == lo || n == hi,
                "{id} holds {n}, fair is {lo}..={hi}: {l:?}"
            );
        }
        assert_eq!(l.values().sum::<usize>(), active, "{l:?}");
        assert!(l.keys().all(|k| live.contains(k)), "{l:?}");
    }

    /// A balanced start: `slots` slots over `workers` workers, from nothing.
    fn balanced(slots: usize, workers: usize) -> (Vec<Option<String>>, Vec<String>) {
        let live = ids(workers);
        let owners = assign(&vec![SlotState::default(); slots], &live);
        assert_fair(&owners, &live, slots);
        (owners, live)
    }

    #[test]
    fn no_live_workers_leave_everything_unassigned() {
        let (owners, _) = balanced(5, 2);
        assert_eq!(assign(&owned(&owners), &[]), vec![None; 5]);
    }

    #[test]
    fn balanced_assignment_is_stable() {
        for (s, w) in [(17, 4), (7, 3), (6, 3), (3, 5), (1, 1), (0, 2)] {
            let (owners, live) = balanced(s, w);
            let again = assign(&owned(&owners), &live);
            assert_eq!(moves(&owners, &again), 0, "{s} slots over {w} workers");
        }
    }

    #[test]
    fn a_killed_worker_moves_exactly_its_slots() {
        let (owners, live) = balanced(17, 4);
        for victim in &live {
            let k = owners.iter().filter(|o| o.as_ref() == Some(victim)).count();
            let survivors: Vec<String> = live.iter().filter(|w| *w != victim).cloned().collect();
            let after = assign(&owned(&owners), &survivors);
            assert_fair(&after, &survivors, 17);
            assert_eq!(moves(&owners, &after), k, "killing {victim} ({k} slots)");
            // Only its slots moved.
            for (b, a) in owners.iter().zip(&after) {
                if b.as_ref() != Some(victim) {
                    assert_eq!(b, a);
                }
            }
        }
    }

    #[test]
    fn a_joining_worker_takes_only_its_share_from_those_above_theirs() {
        let (owners, mut live) = balanced(17, 4);
        let before = loads(&owners);
        live.push("w9".into());
        let after = assign(&owned(&owners), &live);
        assert_fair(&after, &live, 17);
        let taken = after.iter().filter(|o| o.as_deref() == Some("w9")).count();
        assert_eq!(taken, 17 / 5, "the newcomer takes ⌊17/5⌋");
        assert_eq!(
            moves(&owners, &after),
            taken,
            "only the newcomer's slots moved"
        );
        for (b, a) in owners.iter().zip(&after) {
            if b != a {
                assert_eq!(a.as_deref(), Some("w9"));
                let giver = b.clone().expect("assigned before");
                assert!(
                    before[&giver] > 17 / 5,
                    "{giver} gave a slot while at its share"
                );
            }
        }
    }

    #[test]
    fn an_uneven_start_is_evened_with_the_fewest_moves() {
        // w0 holds everything, w1 and w2 just joined.
        let live = ids(3);
        let owners = vec![Some("w0".to_owned()); 7];
        let after = assign(&owned(&owners), &live);
        assert_fair(&after, &live, 7);
        assert_eq!(moves(&owners, &after), 4, "w0 keeps 3 of 7");
    }

    #[test]
    fn orphans_and_new_slots_go_to_those_below_their_share() {
        let live = ids(3);
        let mut owners: Vec<Option<String>> = ["w0", "w0", "w1", "gone", "w2", "w2"]
            .iter()
            .map(|s| Some((*s).to_owned()))
            .collect();
        owners.push(None);
        let after = assign(&owned(&owners), &live);
        assert_fair(&after, &live, 7);
        assert_eq!(moves(&owners, &after), 2, "the orphan and the new slot");
        assert!(after[3] != after[6], "one each to w0 and w1: {after:?}");
        assert_eq!(&after[..3], &owners[..3]);
        assert_eq!(&after[4..6], &owners[4..6]);
    }

    #[test]
    fn resting_slots_are_unassigned_and_count_for_nobody() {
        let (owners, live) = balanced(7, 3);
        let mut slots = owned(&owners);
        // The releaser unassigns the slot; it rests.
        let releaser = owners[0].clone();
        slots[0] = SlotState {
            owner: None,
            released_by: releaser.clone(),
            resting: true,
        };
        let during = assign(&slots, &live);
        assert_eq!(during[0], None);
        assert_eq!(moves(&owners[1..], &during[1..]), 0, "nothing else moves");
        assert_fair(&during, &live, 6);
        // Rested: it goes to another worker.
        let mut slots = owned(&during);
        slots[0].released_by = releaser.clone();
        let after = assign(&slots, &live);
        assert!(after[0].is_some() && after[0] != releaser, "{after:?}");
        assert_fair(&after, &live, 7);
        assert_eq!(moves(&during, &after), 1, "{during:?} → {after:?}");
    }

    #[test]
    fn a_rested_slot_avoids_its_releaser_even_when_only_it_has_room() {
        // 6 slots over 3 workers, 2 each; w0 releases slot 0 and it rests.
        let live = ids(3);
        let owners: Vec<Option<String>> = ["w0", "w0", "w1", "w1", "w2", "w2"]
            .iter()
            .map(|s| Some((*s).to_owned()))
            .collect();
        let mut slots = owned(&owners);
        slots[0] = SlotState {
            owner: None,
            released_by: Some("w0".into()),
            resting: false,
        };
        let after = assign(&slots, &live);
        assert_fair(&after, &live, 6);
        assert_ne!(after[0].as_deref(), Some("w0"));
        assert!(after[0].is_some());
        // One extra move: the new owner hands one of its slots to w0.
        assert_eq!(moves(&owners[1..], &after[1..]), 1, "{after:?}");
        // Alone, the releaser takes it back.
        let alone = assign(&slots, &ids(1));
        assert_eq!(alone[0].as_deref(), Some("w0"));
    }

    #[test]
    fn output_does_not_depend_on_the_order_of_live_workers() {
        let mut rng = StdRng::seed_from_u64(7);
        let live = ids(5);
        let slots: Vec<SlotState> = (0..23)
            .map(|_| SlotState {
                owner: match rng.gen_range(0..7) {
                    0 => None,
                    6 => Some("gone".into()),
                    n => Some(format!("w{}", n - 1)),
                },
                released_by: (rng.gen_range(0..4) == 0)
                    .then(|| format!("w{}", rng.gen_range(0..5))),
                resting: rng.gen_range(0..6) == 0,
            })
            .collect();
        let first = assign(&slots, &live);
        let mut shuffled = live.clone();
        shuffled.reverse();
        shuffled.push("w2".into());
        assert_eq!(assign(&slots, &shuffled), first);
        assert_eq!(assign(&slots, &live), first);
    }

    /// Random states: always fair; resting slots unassigned; without
    /// releasers, exactly the orphans plus the unavoidable excess move;
    /// with them, at most one extra move per released slot.
    #[test]
    fn random_states_move_the_minimum() {
        let mut rng = StdRng::seed_from_u64(42);
        for _ in 0..2_000 {
            let w = rng.gen_range(1..=6);
            let live = ids(w);
            let n = rng.gen_range(0..=30);
            let with_releasers = rng.gen_bool(0.5);
            let slots: Vec<SlotState> = (0..n)
                .map(|_| SlotState {
                    owner: match rng.gen_range(0..w + 2) {
                        0 => None,
                        k if k == w + 1 => Some("gone".into()),
                        k => Some(format!("w{}", k - 1)),
                    },
                    released_by: (with_releasers && rng.gen_bool(0.3))
                        .then(|| format!("w{}", rng.gen_range(0..w))),
                    resting: rng.gen_bool(0.1),
                })
                .collect();
            let after = assign(&slots, &live);
            let active: Vec<usize> = (0..n).filter(|&i| !slots[i].resting).collect();
            let mut owners: Vec<Option<String>> = after.clone();
            for (i, s) in slots.iter().enumerate() {
                if s.resting {
                    assert_eq!(after[i], None);
                    owners[i] = None;
                }
            }
            assert_fair(&after, &live, active.len());
            // The minimum: orphans, plus each worker's excess over the
            // shares handed out largest-holder first.
            let orphans = active
                .iter()
                .filter(|&&i| !slots[i].owner.as_ref().is_some_and(|o| live.contains(o)))
                .count();
            let mut held: Vec<usize> = live
                .iter()
                .map(|id| {
                    active
                        .iter()
                        .filter(|&&i| slots[i].owner.as_ref() == Some(id))
                        .count()
                })
                .collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            let (lo, extra) = (active.len() / w, active.len() % w);
            let excess: usize = held
                .iter()
                .enumerate()
                .map(|(r, &h)| h.saturating_sub(lo + usize::from(r < extra)))
                .sum();
            let minimum = orphans + excess;
            let moved = active
                .iter()
                .filter(|&&i| after[i] != slots[i].owner)
                .count();
            if with_releasers {
                let released = active
                    .iter()
                    .filter(|&&i| slots[i].released_by.is_some())
                    .count();
                assert!(
                    moved >= minimum && moved <= minimum + released,
                    "{moved} vs {minimum}"
                );
            } else {
                assert_eq!(moved, minimum, "{slots:?} over {live:?} → {after:?}");
            }
            // Stable once applied.
            let again: Vec<SlotState> = slots
                .iter()
                .zip(&owners)
                .map(|(s, o)| SlotState {
                    owner: o.clone(),
                    released_by: None,
                    resting: s.resting,
                })
                .collect();
            assert_eq!(assign(&again, &live), owners);
        }
    }
}
