//! `pool.refill`: bring a challenge's pool of unclaimed instances to `min`,
//! without the total (pooled + claimed) exceeding `max` when `max > 0`, and
//! destroy the surplus when `min` went down.
//!
//! Parameters: the challenge id.
//! Steps: 1. read-lock the challenge and write-lock its pool (one refill at a
//! time); 2. count pooled and claimed instances; 3. deploy pooled instances
//! one by one (each a `deploying` reservation, then `pulumi up`, then ready);
//! 4. destroy the newest surplus pooled instances.
//! Undo: a failed deploy drops its own reservation (see `deploy_reserved`);
//! the next refill tries again.

use std::time::SystemTime;

use cm_core::{
    DomainError, Identity, ids,
    model::{InstanceRecord, InstanceStatus, to_timestamp},
    store::Expect,
};
use cm_schemas::v1::{RefillPool, command_result::Outcome};

use super::{HandlerError, destroy_instance, instance_create::deploy_reserved};
use crate::context::Ctx;

#[tracing::instrument(name = "pool.refill", skip_all, fields(challenge = %req.challenge_id, deployed, destroyed))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &RefillPool,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    let locks = ctx.lock_pool(&req.challenge_id).await?;
    let result = refill(ctx, command_id, &req.challenge_id).await;
    locks.release();
    result
}

async fn refill(ctx: &Ctx, command_id: &str, cid: &str) -> Result<Outcome, HandlerError> {
    let Some(challenge) = ctx.store.get_challenge(cid).await? else {
        return Err(DomainError::not_found(format!("challenge {cid} not found")).into());
    };
    let challenge = challenge.value;
    let instances = ctx.store.list_instances(cid).await?;
    let mut pooled: Vec<InstanceRecord> = instances
        .iter()
        .filter(|r| r.source_id.is_none())
        .cloned()
        .collect();
    let mut total = instances.len() as i64;
    let (mut deployed, mut destroyed) = (0, 0);

    while (pooled.len() as i64) < challenge.min && (challenge.max <= 0 || total < challenge.max) {
        let now = SystemTime::now();
        let mut record = InstanceRecord {
            challenge_id: cid.to_owned(),
            identity: Identity::random(),
            source_id: None,
            status: InstanceStatus::Deploying,
            since: to_timestamp(now),
            last_renew: to_timestamp(now),
            until: None,
            connection_info: String::new(),
            flags: Vec::new(),
            additional: Default::default(),
            command_id: command_id.to_owned(),
        };
        ctx.store
            .put_instance(&record, None, Expect::Absent, None)
            .await?;
        deploy_reserved(ctx, &challenge, &mut record).await?;
        pooled.push(record);
        total += 1;
        deployed += 1;
    }

    let surplus = pooled.len() as i64 - challenge.min;
    if surplus > 0 {
        let scenario = ctx.scenario(&challenge.scenario).await?;
        pooled.sort_by_key(|r| (r.since.seconds, r.since.nanos));
        for rec in pooled.iter().rev().take(surplus as usize) {
            destroy_instance(ctx, &scenario, rec).await?;
            destroyed += 1;
        }
    }
    let span = tracing::Span::current();
    span.record("deployed", deployed);
    span.record("destroyed", destroyed);
    Ok(Outcome::Challenge(challenge.to_api(Vec::new())))
}
