//! `LoadBalancerService`: load balancers, listeners, target groups, targets.
