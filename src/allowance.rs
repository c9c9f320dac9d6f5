//! A count of something held at once (body bytes, waiting requests) that
//! may not pass a limit. Taken without waiting: what does not fit is told
//! so at once, and the caller decides what to do instead.

use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Allowance {
    held: AtomicUsize,
    limit: usize,
}

impl Allowance {
    pub const fn new(limit: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// An empty share, to grow as things arrive.
    pub fn share(&self) -> Share<'_> {
        Share {
            allowance: self,
            amount: 0,
        }
    }

    /// A share of `amount`, or `None` when it does not fit.
    pub fn take(&self, amount: usize) -> Option<Share<'_>> {
        let mut share = self.share();
        share.grow(amount).then_some(share)
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Part of an [`Allowance`], given back when dropped.
pub struct Share<'a> {
    allowance: &'a Allowance,
    amount: usize,
}

impl Share<'_> {
    /// Takes `more` as well; `false`, taking nothing, when that would pass
    /// the limit.
    pub fn grow(&mut self, more: usize) -> bool {
        let limit = self.allowance.limit;
        let taken = self
            .allowance
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more).filter(|&after| after <= limit)
            })
            .is_ok();
        if taken {
            self.amount += more;
        }
        taken
    }

    pub fn amount(&self) -> usize {
        self.amount
    }
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        if self.amount > 0 {
            self.allowance.held.fetch_sub(self.amount, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_stay_within_the_limit_and_give_back_on_drop() {
        let allowance = Allowance::new(10);
        let mut first = allowance.share();
        assert!(first.grow(4));
        assert!(first.grow(4));
        assert!(allowance.take(3).is_none(), "8 + 3 passes 10");
        let second = allowance.take(2).expect("8 + 2 fits");
        assert!(!first.grow(1), "full");
        assert_eq!((first.amount(), allowance.held()), (8, 10));
        drop(first);
        assert_eq!(allowance.held(), 2);
        drop(second);
        assert_eq!(allowance.held(), 0);
        assert!(allowance.take(10).is_some());
        assert_eq!(allowance.held(), 0, "a share dropped at once");
        assert!(allowance.take(11).is_none());
        assert!(!allowance.share().grow(usize::MAX), "no overflow");
        assert_eq!(allowance.held(), 0);
    }
}
