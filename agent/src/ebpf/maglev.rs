//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! The table depends only on the backends' addresses and ports, never on
//! node-local ids or the order they were learnt in, so every node given
//! the same backends builds the same table and sends a flow to the same
//! backend. When one backend of N goes away only ~1/N of the table moves.

use dataplane_common::MAGLEV_TABLE_SIZE;

/// A backend as Maglev sees it: a stable name and the node-local id the
/// table stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// IPv4 address and port (network order bytes as a big-endian
    /// integer): the same on every node.
    pub name: u64,
    pub id: u32,
}

/// Fills a lookup table of `MAGLEV_TABLE_SIZE` backend ids. Returns `None`
/// for an empty backend list.
pub fn table(backends: &[MaglevBackend]) -> Option<Vec<u32>> {
    if backends.is_empty() {
        return None;
    }
    let m = MAGLEV_TABLE_SIZE as u64;
    let mut sorted = backends.to_vec();
    sorted.sort_by_key(|b| b.name);
    sorted.dedup_by_key(|b| b.name);
    // Each backend's preference list is offset + j * skip (mod M); M prime
    // and 0 < skip < M make it a permutation of all slots.
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|b| {
            (
                hash(b.name, 0x5eed_0ff5) % m,
                hash(b.name, 0x5eed_5c1b) % (m - 1) + 1,
            )
        })
        .collect();
    let mut next = vec![0u64; sorted.len()];
    let mut table = vec![0u32; MAGLEV_TABLE_SIZE];
    let mut filled = 0;
    // Round-robin over backends, each taking its next free preferred slot,
    // until every slot is taken: at most M rounds of N steps.
    'fill: loop {
        for (i, backend) in sorted.iter().enumerate() {
            let (offset, skip) = perms[i];
            loop {
                let slot = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[slot] == 0 {
                    table[slot] = backend.id;
                    filled += 1;
                    break;
                }
            }
            if filled == MAGLEV_TABLE_SIZE {
                break 'fill;
            }
        }
    }
    Some(table)
}

/// SplitMix64 finaliser keyed by `seed`: two independent hashes of a name.
fn hash(name: u64, seed: u64) -> u64 {
    let mut z = name ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(names: impl IntoIterator<Item = u64>, first_id: u32) -> Vec<MaglevBackend> {
        names
            .into_iter()
            .enumerate()
            .map(|(i, name)| MaglevBackend {
                name,
                id: first_id + i as u32,
            })
            .collect()
    }

    fn share(table: &[u32], id: u32) -> usize {
        table.iter().filter(|slot| **slot == id).count()
    }

    #[test]
    fn every_slot_goes_to_a_backend_in_near_equal_shares() {
        let list = backends(1000..1010, 1);
        let table = table(&list).unwrap();
        let ideal = MAGLEV_TABLE_SIZE / list.len();
        for b in &list {
            let got = share(&table, b.id);
            assert!(
                got.abs_diff(ideal) <= ideal / 10,
                "backend {} has {got} slots, ideal {ideal}",
                b.id
            );
        }
    }

    #[test]
    fn same_backends_give_the_same_choices_whatever_the_ids_and_order() {
        let a = backends(1000..1010, 1);
        let mut b = backends(1000..1010, 500);
        b.reverse();
        let (ta, tb) = (table(&a).unwrap(), table(&b).unwrap());
        let name_of =
            |list: &[MaglevBackend], id: u32| list.iter().find(|x| x.id == id).unwrap().name;
        for (x, y) in ta.iter().zip(&tb) {
            assert_eq!(name_of(&a, *x), name_of(&b, *y));
        }
    }

    #[test]
    fn removing_one_backend_moves_little_more_than_its_share() {
        let all = backends(1000..1010, 1);
        let fewer: Vec<_> = all.iter().copied().filter(|b| b.id != 4).collect();
        let (before, after) = (table(&all).unwrap(), table(&fewer).unwrap());
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| x != y && **x != 4)
            .count();
        // Slots of surviving backends that moved: Maglev keeps this small
        // (the paper reports a few percent of the table).
        assert!(
            moved < MAGLEV_TABLE_SIZE / 10,
            "{moved} slots of surviving backends moved"
        );
        assert_eq!(share(&after, 4), 0);
    }

    #[test]
    fn empty_has_no_table() {
        assert_eq!(table(&[]), None);
    }
}
