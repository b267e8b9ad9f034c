//! How large an adaptive pool should be: the demand estimate of one
//! challenge (its claim rate and its scenario's deploy time) and the plan
//! drawn from it.
//!
//! A pool covers the claims expected while the instances replacing them
//! deploy: `rate × deploy time`, times a headroom (half of it deploying,
//! half ready for the claims that arrive meanwhile). The admin's `min` and
//! `max` stay hard bounds.
//!
//! The claim rate is three exponentially decayed averages of the claims
//! seen: an onset one (a few seconds), a fast one (seconds) and a slow one
//! (minutes). The pool follows the largest, so it grows as soon as a burst
//! starts and shrinks only once the slow average has come down too. The
//! onset average is what a burst's first claims move: with a time constant
//! of a few seconds it reaches the burst's rate within a few claims, where
//! the fast one takes its whole time constant. It leaves out the latest
//! claim (it is the rate seen just before it), so a lone claim after a quiet
//! spell, which says nothing of a rate, deploys no more than the fast
//! average asks for.
//! It grows below `target` and shrinks above `keep` (down to `keep`, not to
//! `target`), and not at all while claims keep coming (one within the fast
//! average's time constant): a steady rate, however noisy its estimate or
//! the deploy times measured, never deploys and destroys instances by
//! turns. Once claims pause, the pool shrinks as the averages decay.
//!
//! Owns: the estimate's arithmetic and its stored form. Must not know: where
//! it is stored (`store`) or who deploys (`worker`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a challenge's pool is sized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// `min` ready instances, as chall-manager does.
    #[default]
    Static,
    /// Sized from the observed demand, within `min` and `max`.
    Adaptive,
}

impl PoolMode {
    /// The name on the wire (`static`, `adaptive`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Adaptive => "adaptive",
        }
    }

    /// Reads the wire name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "static" => Some(Self::Static),
            "adaptive" => Some(Self::Adaptive),
            _ => None,
        }
    }
}

/// The estimator's settings (worker flags).
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Time constant of the onset claim-rate average.
    pub onset: Duration,
    /// Time constant of the fast claim-rate average.
    pub fast: Duration,
    /// Time constant of the slow claim-rate average.
    pub slow: Duration,
    /// Instances kept per claim expected during one deploy.
    pub headroom: f64,
    /// Deploy time assumed before the first one is measured.
    pub first_deploy: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            onset: Duration::from_secs(3),
            fast: Duration::from_secs(15),
            slow: Duration::from_secs(120),
            headroom: 2.0,
            first_deploy: Duration::from_secs(5),
        }
    }
}

/// Unix time now, in seconds (the estimate's clock).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Weight of a new deploy time in the deploy-time average.
const DEPLOY_WEIGHT: f64 = 0.3;

/// One challenge's demand, as stored (JSON) beside its records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    /// Claims per second, onset average, as of `at` (the latest claim
    /// counted in; [`Demand::rate_at`] leaves it out). Absent from
    /// estimates stored before it existed: zero, filled by the next claims.
    #[serde(default)]
    pub onset_rate: f64,
    /// Claims per second, fast average, as of `at`.
    pub fast_rate: f64,
    /// Claims per second, slow average, as of `at`.
    pub slow_rate: f64,
    /// Unix time (seconds) the rates were last moved to.
    pub at: f64,
    /// Average deploy time of the scenario, seconds (0: none measured).
    pub deploy_seconds: f64,
    /// Claims seen (served from the pool or deployed on demand).
    pub claims: u64,
}

fn decay(rate: f64, elapsed: f64, tau: Duration) -> f64 {
    let tau = tau.as_secs_f64().max(1e-3);
    rate * (-elapsed.max(0.0) / tau).exp()
}

/// What one claim adds to an average of time constant `tau`.
fn one_claim(tau: Duration) -> f64 {
    1.0 / tau.as_secs_f64().max(1e-3)
}

impl Demand {
    /// A claim (served or not) at unix time `now`.
    pub fn claimed(&mut self, now: f64, tuning: &Tuning) {
        let elapsed = now - self.at;
        self.onset_rate = decay(self.onset_rate, elapsed, tuning.onset) + one_claim(tuning.onset);
        self.fast_rate = decay(self.fast_rate, elapsed, tuning.fast) + one_claim(tuning.fast);
        self.slow_rate = decay(self.slow_rate, elapsed, tuning.slow) + one_claim(tuning.slow);
        self.at = self.at.max(now);
        self.claims += 1;
    }

    /// A deploy of the scenario took `seconds`.
    pub fn deployed(&mut self, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        self.deploy_seconds = if self.deploy_seconds > 0.0 {
            self.deploy_seconds * (1.0 - DEPLOY_WEIGHT) + seconds * DEPLOY_WEIGHT
        } else {
            seconds
        };
    }

    /// The claim rate the pool follows at unix time `now`, per second: the
    /// largest of the three averages (the onset one without the latest
    /// claim).
    pub fn rate_at(&self, now: f64, tuning: &Tuning) -> f64 {
        let elapsed = now - self.at;
        let onset = (self.onset_rate - one_claim(tuning.onset)).max(0.0);
        decay(onset, elapsed, tuning.onset)
            .max(decay(self.fast_rate, elapsed, tuning.fast))
            .max(decay(self.slow_rate, elapsed, tuning.slow))
    }

    /// The deploy time used: measured, else the assumed first one.
    pub fn deploy_time(&self, tuning: &Tuning) -> f64 {
        if self.deploy_seconds > 0.0 {
            self.deploy_seconds
        } else {
            tuning.first_deploy.as_secs_f64()
        }
    }

    /// Pooled instances (ready or deploying) the demand asks for at `now`,
    /// before the admin's bounds.
    pub fn wanted(&self, now: f64, tuning: &Tuning) -> i64 {
        let w = self.rate_at(now, tuning) * self.deploy_time(tuning) * tuning.headroom;
        // A trace of past demand (a rate decayed to almost nothing) asks for
        // no instance: below a tenth of one, it is none.
        if w < 0.1 { 0 } else { w.ceil() as i64 }
    }
}

/// What the demand asks of a pool at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// Pooled instances (ready or deploying), before the admin's bounds.
    pub instances: i64,
    /// Claims keep coming (the last within the fast time constant): the
    /// pool does not shrink.
    pub flowing: bool,
}

impl Want {
    /// No demand (a static pool, or none seen).
    pub const NONE: Self = Self {
        instances: 0,
        flowing: false,
    };
}

impl Demand {
    /// What this demand asks of the pool at unix time `now`.
    pub fn want(&self, now: f64, tuning: &Tuning) -> Want {
        Want {
            instances: self.wanted(now, tuning),
            flowing: self.claims > 0 && now - self.at < tuning.fast.as_secs_f64(),
        }
    }
}

/// What a refill aims at: deploy while the pool has fewer than `target`
/// instances, destroy while it has more than `keep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub target: i64,
    pub keep: i64,
}

impl Plan {
    /// A static pool: exactly `min`.
    pub fn fixed(min: i64) -> Self {
        Self {
            target: min,
            keep: min,
        }
    }

    /// An adaptive pool of a challenge with bounds `min`/`max` (`max` 0: no
    /// cap) of which `claimed` instances are claimed.
    pub fn adaptive(min: i64, max: i64, claimed: i64, want: Want) -> Self {
        let wanted = want.instances.max(0);
        let mut target = min.max(wanted);
        // While claims come, nothing is destroyed; once they pause, half the
        // demand again is kept (none once the demand is gone).
        let mut keep = if want.flowing {
            i64::MAX
        } else {
            target + wanted / 2
        };
        if max > 0 {
            let room = (max - claimed).max(0);
            target = target.min(room.max(min.min(room)));
            keep = keep.min(room.max(min));
        }
        Self {
            target,
            keep: keep.max(target),
        }
    }

    /// Of `mode`.
    pub fn of(mode: PoolMode, min: i64, max: i64, claimed: i64, want: Want) -> Self {
        match mode {
            PoolMode::Static => Self::fixed(min),
            PoolMode::Adaptive => Self::adaptive(min, max, claimed, want),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuning() -> Tuning {
        Tuning {
            onset: Duration::from_secs(3),
            fast: Duration::from_secs(10),
            slow: Duration::from_secs(60),
            headroom: 2.0,
            first_deploy: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_steady_rate_is_estimated() {
        let t = tuning();
        let mut d = Demand::default();
        // 2 claims a second for 5 minutes.
        for i in 0..600 {
            d.claimed(1000.0 + f64::from(i) * 0.5, &t);
        }
        let r = d.rate_at(1300.0, &t);
        assert!((r - 2.0).abs() < 0.2, "rate {r}");
        d.deployed(3.0);
        // 2/s x 3 s x 2 = 12.
        let w = d.wanted(1300.0, &t);
        assert!((11..=13).contains(&w), "wanted {w}");
    }

    #[test]
    fn a_burst_raises_the_estimate_within_seconds_and_it_decays_after() {
        let t = tuning();
        let mut d = Demand::default();
        d.deployed(2.0);
        for i in 0..10 {
            d.claimed(100.0 + f64::from(i) * 0.2, &t);
        }
        assert!(d.wanted(102.0, &t) >= 3, "{}", d.wanted(102.0, &t));
        // Ten minutes of silence: nothing wanted.
        assert_eq!(d.wanted(702.0, &t), 0);
    }

    #[test]
    fn the_slow_average_holds_the_pool_after_a_burst_stops() {
        let t = tuning();
        let mut d = Demand::default();
        d.deployed(2.0);
        for i in 0..120 {
            d.claimed(f64::from(i) * 0.5, &t);
        }
        let during = d.wanted(60.0, &t);
        let after_fast = d.wanted(90.0, &t);
        assert!(
            after_fast > 0 && after_fast < during,
            "{during} {after_fast}"
        );
    }

    #[test]
    fn the_first_claims_of_a_burst_grow_the_pool() {
        let t = tuning();
        let onset_off = Tuning { onset: t.fast, ..t };
        let (mut with, mut without) = (Demand::default(), Demand::default());
        with.deployed(3.0);
        without.deployed(3.0);
        // A burst of one claim a second, which needs 1/s x 3 s x 2 = 6:
        // after its fourth claim the onset average asks for 4 (0.53/s), the
        // fast one alone for 3 (0.35/s).
        for i in 0..4 {
            with.claimed(100.0 + f64::from(i), &t);
            without.claimed(100.0 + f64::from(i), &onset_off);
        }
        let (early, late) = (with.wanted(103.0, &t), without.wanted(103.0, &onset_off));
        assert!(early >= 4, "with the onset average: {early}");
        assert!(early > late, "fast alone {late}, onset {early}");
    }

    #[test]
    fn a_lone_claim_asks_no_more_than_the_fast_average_does() {
        let t = tuning();
        let mut d = Demand::default();
        d.deployed(3.0);
        d.claimed(1000.0, &t);
        // The fast average alone: 1/10 per second x 3 s x 2 = 0.6, one.
        assert_eq!(d.wanted(1000.0, &t), 1);
    }

    #[test]
    fn an_estimate_stored_without_the_onset_average_still_reads() {
        let stored =
            r#"{"fast_rate":0.5,"slow_rate":0.1,"at":10.0,"deploy_seconds":2.0,"claims":7}"#;
        let d: Demand = serde_json::from_str(stored).expect("an older estimate");
        assert_eq!(d.onset_rate, 0.0);
        assert!((d.rate_at(10.0, &tuning()) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn the_first_deploy_time_is_the_measure_then_an_average() {
        let mut d = Demand::default();
        d.deployed(4.0);
        assert_eq!(d.deploy_seconds, 4.0);
        d.deployed(14.0);
        assert!((d.deploy_seconds - 7.0).abs() < 1e-9);
        d.deployed(f64::NAN);
        assert!((d.deploy_seconds - 7.0).abs() < 1e-9);
    }

    fn paused(instances: i64) -> Want {
        Want {
            instances,
            flowing: false,
        }
    }

    #[test]
    fn plans_respect_min_and_max() {
        assert_eq!(Plan::fixed(3), Plan { target: 3, keep: 3 });
        // No demand: min.
        assert_eq!(
            Plan::adaptive(2, 60, 0, Want::NONE),
            Plan { target: 2, keep: 2 }
        );
        // Demand 10, claims paused: grow to 10, shrink above 15.
        assert_eq!(
            Plan::adaptive(2, 60, 0, paused(10)),
            Plan {
                target: 10,
                keep: 15
            }
        );
        // The cap counts claimed instances: 55 claimed, room for 5.
        assert_eq!(
            Plan::adaptive(2, 60, 55, paused(10)),
            Plan { target: 5, keep: 5 }
        );
        // No room at all: nothing to deploy, nothing kept beyond min.
        assert_eq!(
            Plan::adaptive(2, 60, 60, paused(10)),
            Plan { target: 0, keep: 2 }
        );
        // No cap.
        assert_eq!(
            Plan::adaptive(0, 0, 500, paused(40)),
            Plan {
                target: 40,
                keep: 60
            }
        );
    }

    #[test]
    fn nothing_is_destroyed_while_claims_keep_coming() {
        let flowing = Want {
            instances: 3,
            flowing: true,
        };
        assert_eq!(Plan::adaptive(1, 0, 10, flowing).keep, i64::MAX);
        // Still within max: what max leaves, or min.
        assert_eq!(
            Plan::adaptive(1, 20, 10, flowing),
            Plan {
                target: 3,
                keep: 10
            }
        );
        let t = tuning();
        let mut d = Demand::default();
        d.deployed(1.0);
        d.claimed(100.0, &t);
        assert!(d.want(105.0, &t).flowing, "5 s after a claim, fast is 10 s");
        assert!(!d.want(111.0, &t).flowing);
        assert!(!Demand::default().want(0.0, &t).flowing, "no claim ever");
    }

    #[test]
    fn modes_read_and_print_their_wire_names() {
        for m in [PoolMode::Static, PoolMode::Adaptive] {
            assert_eq!(PoolMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(PoolMode::parse("Adaptive"), None);
        assert_eq!(PoolMode::default(), PoolMode::Static);
    }
}
