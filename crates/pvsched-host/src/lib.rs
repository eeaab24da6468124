//! Host daemon library: VM discovery, QMP, shared-page mapping, actuators, host information.
