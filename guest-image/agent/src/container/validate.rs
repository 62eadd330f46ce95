//! Checks of what a request names: ids and the OCI process.

use oci_spec::runtime::Process as OciProcess;

use super::error::{ContainerError, IdError};

/// The longest container or exec id, in bytes.
const ID_MAX_LEN: usize = 64;

/// Checks that `id` can name a container or an exec process (and so a
/// directory of the agent's state): 1-64 characters from `[A-Za-z0-9_+.-]`,
/// neither `.` nor `..`.
pub(super) fn validate_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > ID_MAX_LEN {
        return Err(IdError::TooLong(id.len()));
    }
    if id == "." || id == ".." {
        return Err(IdError::Dots(id.to_owned()));
    }
    match id
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.')))
    {
        Some(c) => Err(IdError::Character(c)),
        None => Ok(()),
    }
}

/// Checks what libcontainer would otherwise refuse late or not at all: the
/// program to run, the user ids and the working directory.
pub(super) fn validate_process(process: &OciProcess) -> Result<(), ContainerError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(ContainerError::InvalidSpec(
            "process.args is empty; give the program to run".into(),
        ));
    }
    let user = process.user();
    if user.uid() == u32::MAX {
        return Err(ContainerError::InvalidSpec(format!(
            "process.user.uid {} is not a valid uid",
            user.uid()
        )));
    }
    if user.gid() == u32::MAX {
        return Err(ContainerError::InvalidSpec(format!(
            "process.user.gid {} is not a valid gid",
            user.gid()
        )));
    }
    if let Some(gids) = user.additional_gids() {
        if let Some(bad) = gids.iter().find(|g| **g == u32::MAX) {
            return Err(ContainerError::InvalidSpec(format!(
                "process.user.additionalGids contains {bad}, which is not a valid gid"
            )));
        }
    }
    if !process.cwd().is_absolute() {
        return Err(ContainerError::InvalidSpec(format!(
            "process.cwd {:?} must be an absolute path",
            process.cwd()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_say_why_they_are_refused() {
        for ok in ["web", "a", "web-1.2_x+y", "...", &"x".repeat(64)] {
            assert_eq!(validate_id(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(validate_id(""), Err(IdError::Empty));
        assert_eq!(validate_id(&"x".repeat(65)), Err(IdError::TooLong(65)));
        assert_eq!(validate_id(".."), Err(IdError::Dots("..".into())));
        assert_eq!(validate_id("."), Err(IdError::Dots(".".into())));
        assert_eq!(validate_id("a/b"), Err(IdError::Character('/')));
        assert_eq!(validate_id("wéb"), Err(IdError::Character('é')));
    }
}
