//! Command-line/environment options every binary shares: where NATS and etcd
//! are. Each binary flattens [`ConnectArgs`] into its own clap parser.

/// Where the queue and the store are.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "CM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "CM_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,

    /// Prefix of every key this system writes in etcd.
    #[arg(long, env = "CM_ETCD_ROOT", default_value = "/cm")]
    pub etcd_root: String,
}
