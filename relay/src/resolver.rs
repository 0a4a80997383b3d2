//! Resolve the upstream endpoint's name with `hickory-resolver` against the configured
//! resolvers (the VPC resolver, which holds the endpoint's private DNS). hickory caches each
//! answer for its TTL.

use std::io;
use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{Resolver, TokioResolver};

use crate::error::StartError;

pub struct UpstreamResolver {
    resolver: TokioResolver,
}

impl UpstreamResolver {
    /// Use `servers`; with none, the system's resolver configuration (`/etc/resolv.conf`).
    pub fn new(servers: &[SocketAddr]) -> Result<UpstreamResolver, StartError> {
        let mut opts = ResolverOpts::default();
        // The relay dials every address it gets, in order, so both families are useful.
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        let resolver = if servers.is_empty() {
            Resolver::builder_tokio()
                .map_err(|e| StartError::SystemResolver(e.to_string()))?
                .with_options(opts)
                .build()
        } else {
            let mut config = ResolverConfig::new();
            for server in servers {
                config.add_name_server(NameServerConfig::new(*server, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*server, Protocol::Tcp));
            }
            Resolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build()
        };
        Ok(UpstreamResolver { resolver })
    }

    /// Every address for `host`, IPv4 first. An IP literal is returned as is.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        // A trailing dot keeps search domains out of the lookup.
        let fqdn = if host.ends_with('.') {
            host.to_string()
        } else {
            format!("{host}.")
        };
        let lookup = self
            .resolver
            .lookup_ip(fqdn.as_str())
            .await
            .map_err(|e| io::Error::other(format!("cannot resolve {host}: {e}")))?;
        let mut addrs: Vec<SocketAddr> =
            lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        addrs.sort_by_key(|a| a.is_ipv6());
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no addresses"),
            ));
        }
        Ok(addrs)
    }
}
