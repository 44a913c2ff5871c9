//! `InstanceService` and `VolumeService`.
