/*
 * imserver web client: plain JavaScript, no build step, no external resources.
 * Speaks the v1 contract in shared/spec/protocol.md: HTTP under /api/..., one
 * WebSocket at ws(s)://<host>/ws?token=<token>.
 *
 * Stable selectors (for Playwright and other UI tests)
 * -----------------------------------------------------
 * Sign-in view (#auth-view, shown while logged out)
 *   #username, #password        text inputs
 *   #login                      button: POST /api/tokens
 *   #register                   button: POST /api/users, then logs in
 * Always present
 *   #error                      banner with the last error, hidden when none;
 *                               text is "<code>: <message>", attribute
 *                               data-code="<code>"; #error-close dismisses it.
 *                               Server errors (HTTP envelope or socket `error`
 *                               frame) and local input checks (code
 *                               "client_invalid") land here.
 * App view (#app-view, shown while logged in)
 *   #me                         "<username> (id <id>)", attribute data-user-id
 *   #conn-state                 text exactly "connecting" | "online" | "offline"
 *                               (same in data-state); "online" only after the
 *                               server's `ready` frame
 *   #conn-notice                shown when offline: reconnect countdown, or the
 *                               "replaced" notice (data-reason="replaced" |
 *                               "retrying"); #reconnect reconnects now
 *   #logout                     button
 *   #new-chat-id, #new-chat-open  open a one-to-one chat by username (looked
 *                               up with GET /api/users?username=) or numeric
 *                               user id; digits alone are an id, "@<name>"
 *                               forces a name; an unknown name shows the
 *                               server's error (not_found) in #error
 *   #group-name, #group-members, #group-create
 *                               create a group; members = comma-separated
 *                               usernames or ids (as #new-chat-id); opens the
 *                               new group
 *   #conversations .conversation[data-kind][data-id]
 *                               data-kind = "user" | "group"; data-id = the
 *                               user id or group id; class "active" (and
 *                               aria-current="true") on the open one;
 *     .unread                   unread badge; text is the count, attribute
 *                               data-count; hidden when 0
 *     .presence                 people only: class "online" | "offline" |
 *                               "unknown", attribute data-online="true|false"
 *     .conv-name                display name: the username (groups: the group's
 *                               name); "user <id>" until the name is known, or
 *                               if looking it up failed
 *   #chat-title                 title of the open conversation (a username
 *                               for people, as .conv-name)
 *   #back                       back to the list (narrow screens: at <= 720 px
 *                               wide only one pane shows, so the sidebar, with
 *                               #new-chat-id and the group form, is hidden while
 *                               a conversation is open; #layout[data-pane] is
 *                               "list" or "chat")
 *   #messages .message          one element per message, in id order, pending last
 *        [data-id]              the server id (absent while pending)
 *        [data-cid]             the client id for own messages
 *        [data-status]          "pending" | "sent" | "error" | "received"
 *        [data-from]            sender user id
 *     .sender                   groups, others' messages: the sender's username
 *                               ("user <id>" while unknown); hidden otherwise
 *     .body                     the body text (textContent)
 *     .message-error            the error frame's "<code>: <message>"
 *     .retry                    resend a failed message (same cid)
 *   #load-older                 load older history (also happens on scroll-up)
 *   #composer                   textarea: Enter sends, Shift+Enter new line
 *   #send                       send button
 *   #add-member-id, #add-member add a member (username or id) to the open
 *                               group (owner only)
 *   #leave-group                leave the open group (click twice to confirm)
 *
 * Storage: localStorage "imserver.token", "imserver.user_id",
 * "imserver.username", "imserver.expires_at"; "imserver.names" (id -> username
 * learnt in this browser, shared by its tabs and accounts: usernames never
 * change); "imserver.convs.<uid>" (people list, unread counts).
 * sessionStorage "imserver.open.<uid>" (the open conversation).
 *
 * Names: people are shown by username. An id whose name is not cached yet is
 * shown as "user <id>" at once and looked up in the background with
 * GET /api/users/<id> (at most NAME_LOOKUPS_MAX at a time, each id once); the
 * answer re-renders the list, the header and the sender labels. A failed
 * lookup keeps "user <id>" (404: for this page load; other errors: retried
 * after NAME_RETRY_MS). Typed names (#new-chat-id, group members) are always
 * asked of the server (GET /api/users?username=), never taken from the cache.
 *
 * Behaviour notes: own messages are "pending" until `sent` (same cid); pending
 * ones written offline go out after the next `ready`, resent with the same cid
 * (the server stores a cid once). Acks are cumulative, sent at most every
 * 200 ms, for the highest contiguous seq received on the current connection
 * (the first seq on a connection starts the run: the server replays from its
 * cursor + 1). Close 4001 (replaced) stops auto-reconnect until #reconnect.
 *
 * User data is only ever written with textContent / attributes, never innerHTML.
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- constants
  var LS_TOKEN = 'imserver.token';
  var LS_UID = 'imserver.user_id';
  var LS_UNAME = 'imserver.username';
  var LS_EXPIRES = 'imserver.expires_at';
  var LS_NAMES = 'imserver.names';
  var HISTORY_PAGE = 50;
  var PING_EVERY_MS = 20000;
  var DEAD_AFTER_MS = 65000;       // nothing heard for this long: treat the socket as dead
  var PRESENCE_EVERY_MS = 10000;
  var ACK_DELAY_MS = 200;
  var BACKOFF_MIN_MS = 1000;
  var BACKOFF_MAX_MS = 30000;
  var MAX_FRAME_BYTES = 65536;     // server default; a bigger frame would close the socket (1009)
  var CLOSE_REPLACED = 4001;
  var NAME_LOOKUPS_MAX = 4;        // GET /api/users/<id> requests in flight at once
  var NAME_RETRY_MS = 30000;       // a lookup that failed (not 404) is retried after this

  // -------------------------------------------------------------------- state
  var state = {
    token: null,
    me: null,                      // {id, username}
    names: {},                     // "id" -> username (see rememberName)
    lookups: newLookups(),         // GET /api/users/<id> in progress (see requestName)
    nameRenderTimer: null,
    convs: new Map(),              // key -> conversation
    openKey: null,
    presence: {},                  // "id" -> bool
    pendingByCid: new Map(),       // cid -> {conv, msg}
    localCounter: 0,
    // socket
    ws: null,
    wsGen: 0,
    conn: 'offline',
    backoffAttempt: 0,
    reconnectTimer: null,
    reconnectAt: 0,
    countdownTimer: null,
    pingTimer: null,
    lastHeard: 0,
    replaced: false,
    // acks (per connection)
    seqContig: null,
    seqAbove: new Set(),
    seqAcked: 0,
    ackTimer: null,
    // misc
    presenceTimer: null,
    leaveArmed: null,
  };

  var el = {};

  function $(id) { return document.getElementById(id); }

  // ------------------------------------------------------------------ helpers
  function convKey(kind, id) { return kind + ':' + id; }

  function isPosInt(v) { return typeof v === 'number' && Number.isInteger(v) && v > 0; }

  function parseId(text) {
    var t = String(text).trim();
    if (!/^\d{1,15}$/.test(t)) return null;
    var n = Number(t);
    return n > 0 ? n : null;
  }

  function newCid() {
    var bytes = new Uint8Array(12);
    (window.crypto || window.msCrypto).getRandomValues(bytes);
    var hex = '';
    for (var i = 0; i < bytes.length; i++) hex += (bytes[i] < 16 ? '0' : '') + bytes[i].toString(16);
    return 'c' + Date.now().toString(36) + '-' + hex;   // well under 64 chars
  }

  function utf8Length(s) {
    if (window.TextEncoder) return new TextEncoder().encode(s).length;
    return unescape(encodeURIComponent(s)).length;
  }

  // The name to show for user `id`: the username if known, else "user <id>"
  // (and the name is looked up in the background; see requestName).
  function userName(id) {
    if (state.me && id === state.me.id) return state.me.username || ('user ' + id);
    var n = state.names[String(id)];
    if (n) return n;
    requestName(id);
    return 'user ' + id;
  }

  function fmtTime(ts) {
    if (!ts) return '';
    var d = new Date(ts);
    var now = new Date();
    var time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    if (d.toDateString() === now.toDateString()) return time;
    return d.toLocaleDateString([], { month: 'short', day: 'numeric' }) + ' ' + time;
  }

  function preview(body) {
    var s = String(body || '').replace(/\s+/g, ' ').trim();
    return s.length > 80 ? s.slice(0, 80) + '\u2026' : s;
  }

  function lsGet(key) { try { return localStorage.getItem(key); } catch (e) { return null; } }
  function lsSet(key, val) { try { localStorage.setItem(key, val); } catch (e) { /* quota / private mode */ } }
  function lsDel(key) { try { localStorage.removeItem(key); } catch (e) { /* ignore */ } }
  function ssGet(key) { try { return sessionStorage.getItem(key); } catch (e) { return null; } }
  function ssSet(key, val) { try { sessionStorage.setItem(key, val); } catch (e) { /* ignore */ } }

  // ------------------------------------------------------------------- errors
  function ApiError(code, message, status) {
    this.code = code;
    this.message = message;
    this.status = status;
  }

  function showError(code, message) {
    if (code instanceof ApiError || (code && typeof code === 'object')) {
      message = code.message;
      code = code.code;
    }
    code = code || 'error';
    el.errorText.textContent = code + ': ' + (message || '');
    el.error.setAttribute('data-code', code);
    el.error.hidden = false;
  }

  function clearError() {
    el.error.hidden = true;
    el.errorText.textContent = '';
    el.error.removeAttribute('data-code');
  }

  // --------------------------------------------------------------------- HTTP
  function api(method, path, body) {
    var headers = { 'Accept': 'application/json' };
    var opts = { method: method, headers: headers, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    var sentToken = state.token;
    if (sentToken) headers['Authorization'] = 'Bearer ' + sentToken;
    return fetch(path, opts).then(function (res) {
      return res.text().then(function (text) {
        var data = null;
        if (text) {
          try { data = JSON.parse(text); } catch (e) { data = null; }
        }
        if (!res.ok) {
          var env = data && data.error && typeof data.error === 'object' ? data.error : null;
          var code = (env && env.code) || ('http_' + res.status);
          var msg = (env && env.message) || res.statusText || ('HTTP ' + res.status);
          var err = new ApiError(code, msg, res.status);
          if (res.status === 401 && sentToken) {
            // The token is bad or expired: log out once, showing this error;
            // report() then leaves the banner alone for this and later calls.
            err.handled = true;
            if (sentToken === state.token) authLost(err);
          }
          throw err;
        }
        return data;
      });
    }, function (e) {
      throw new ApiError('network_error', 'Could not reach the server (' + (e && e.message || e) + ')', 0);
    });
  }

  // Report any failure of an HTTP call in #error.
  function report(err) {
    if (err && err.handled) return;   // already shown (see api())
    if (err instanceof ApiError) showError(err);
    else showError('client_error', String(err && err.message || err));
    if (!(err instanceof ApiError) && window.console) console.error(err);
  }

  // ------------------------------------------------------------ auth / views
  function showAuth() {
    el.appView.hidden = true;
    el.authView.hidden = false;
    document.title = 'imserver chat';
    setTimeout(function () { (el.username.value ? el.password : el.username).focus(); }, 0);
  }

  function showApp() {
    el.authView.hidden = true;
    el.appView.hidden = false;
  }

  function expiryMs(v) {
    var n = Number(v);
    if (!isFinite(n) || n <= 0) return 0;
    return n < 1e12 ? n * 1000 : n;   // the contract says ms; accept seconds too
  }

  function credentials() {
    return { username: el.username.value.trim(), password: el.password.value };
  }

  function setAuthBusy(busy) {
    el.login.disabled = busy;
    el.register.disabled = busy;
  }

  function doLogin(creds) {
    return api('POST', '/api/tokens', creds).then(function (tok) {
      if (!tok || typeof tok.token !== 'string' || !isPosInt(tok.user_id)) {
        throw new ApiError('bad_response', 'The server answered an unexpected token response', 200);
      }
      state.token = tok.token;
      state.me = { id: tok.user_id, username: creds.username };
      lsSet(LS_TOKEN, tok.token);
      lsSet(LS_UID, String(tok.user_id));
      lsSet(LS_UNAME, creds.username);
      if (tok.expires_at != null) lsSet(LS_EXPIRES, String(tok.expires_at)); else lsDel(LS_EXPIRES);
      rememberName(tok.user_id, creds.username);
      el.password.value = '';
      clearError();
      startApp();
    });
  }

  function onLoginClick(ev) {
    if (ev) ev.preventDefault();
    var creds = credentials();
    setAuthBusy(true);
    doLogin(creds).catch(report).then(function () { setAuthBusy(false); });
  }

  function onRegisterClick(ev) {
    if (ev) ev.preventDefault();
    var creds = credentials();
    setAuthBusy(true);
    api('POST', '/api/users', creds).then(function (user) {
      if (user && isPosInt(user.id)) rememberName(user.id, user.username || creds.username);
      return doLogin(creds);
    }).catch(report).then(function () { setAuthBusy(false); });
  }

  function authLost(err) {
    if (!state.token) return;
    logout();
    showError(err.code || 'unauthorized', (err.message || 'Not signed in') + ' \u2014 please log in again');
  }

  function logout() {
    stopAll();
    state.token = null;
    state.me = null;
    state.convs = new Map();
    state.openKey = null;
    state.presence = {};
    state.pendingByCid = new Map();
    state.lookups = newLookups();   // answers still in flight update the cache only
    lsDel(LS_TOKEN);
    lsDel(LS_UID);
    lsDel(LS_UNAME);
    lsDel(LS_EXPIRES);
    el.conversations.textContent = '';
    el.messageItems.textContent = '';
    el.password.value = '';
    setConn('offline');
    hideNotice();
    showAuth();
  }

  function stopAll() {
    closeSocket();
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    clearInterval(state.countdownTimer);
    state.countdownTimer = null;
    clearInterval(state.presenceTimer);
    state.presenceTimer = null;
    state.replaced = false;
    state.backoffAttempt = 0;
  }

  // ------------------------------------------------------------------ names
  // The id -> username map stored in localStorage, keeping only well-formed
  // entries (another tab, or an older version of this page, wrote it).
  function storedNames() {
    var out = {};
    var n;
    try { n = JSON.parse(lsGet(LS_NAMES) || '{}'); } catch (e) { n = null; }
    if (!n || typeof n !== 'object' || Array.isArray(n)) return out;
    Object.keys(n).forEach(function (k) {
      if (/^[1-9]\d{0,14}$/.test(k) && typeof n[k] === 'string' && n[k]) out[k] = n[k];
    });
    return out;
  }

  // Add what localStorage knows (other tabs learn names too) to state.names;
  // return whether anything was new.
  function mergeStoredNames() {
    var stored = storedNames();
    var changed = false;
    Object.keys(stored).forEach(function (k) {
      if (state.names[k] !== stored[k]) { state.names[k] = stored[k]; changed = true; }
    });
    return changed;
  }

  function rememberName(id, username) {
    if (!isPosInt(id) || typeof username !== 'string' || !username) return;
    var k = String(id);
    if (state.names[k] === username) return;
    state.names[k] = username;
    delete state.lookups.failed[k];
    mergeStoredNames();
    state.names[k] = username;
    lsSet(LS_NAMES, JSON.stringify(state.names));
  }

  function loadNames() {
    state.names = {};
    mergeStoredNames();
  }

  function newLookups() {
    return {
      queue: [],          // ids waiting for a free slot
      waiting: {},        // "id" -> true while queued or in flight
      active: 0,          // requests in flight
      failed: {},         // "id" -> time before which not to ask again (Infinity: 404)
    };
  }

  // Look up user `id`'s name in the background, once; the answer re-renders
  // whatever shows it. Never throws, never reports: "user <id>" stays on failure.
  function requestName(id) {
    if (!isPosInt(id) || !state.token) return;
    var k = String(id);
    var lk = state.lookups;
    if (state.names[k] || lk.waiting[k]) return;
    if (lk.failed[k] && Date.now() < lk.failed[k]) return;
    lk.waiting[k] = true;
    lk.queue.push(id);
    pumpLookups(lk);
  }

  function pumpLookups(lk) {
    while (lk === state.lookups && state.token && lk.active < NAME_LOOKUPS_MAX && lk.queue.length) {
      lookUpId(lk, lk.queue.shift());
    }
  }

  function lookUpId(lk, id) {
    var k = String(id);
    lk.active += 1;
    api('GET', '/api/users/' + id).then(function (u) {
      if (u && u.id === id && typeof u.username === 'string' && u.username) {
        rememberName(id, u.username);
        scheduleNameRender();
      } else {
        lk.failed[k] = Date.now() + NAME_RETRY_MS;
      }
    }, function (err) {
      // 404: no such user (for this page load). 401 logged out (see api()).
      if (err && err.status === 404) lk.failed[k] = Infinity;
      else if (!(err && err.status === 401)) lk.failed[k] = Date.now() + NAME_RETRY_MS;
    }).then(function () {
      lk.active -= 1;
      delete lk.waiting[k];
      pumpLookups(lk);
    });
  }

  // Names arrive one by one: re-render once for a burst of them.
  function scheduleNameRender() {
    if (state.nameRenderTimer) return;
    state.nameRenderTimer = setTimeout(function () {
      state.nameRenderTimer = null;
      if (!state.me) return;
      renderConvList();
      renderChatHeader();
      if (openConvObj()) renderMessages('auto');
    }, 0);
  }

  // Find a typed username's id (GET /api/users?username=), remembering the
  // name. Rejects with the server's error, the name appended to its message.
  function lookUpUsername(name) {
    return api('GET', '/api/users?username=' + encodeURIComponent(name)).then(function (u) {
      if (!u || !isPosInt(u.id)) {
        throw new ApiError('bad_response', 'The server answered an unexpected user', 200);
      }
      rememberName(u.id, typeof u.username === 'string' ? u.username : name);
      return u.id;
    }, function (err) {
      if (err instanceof ApiError && err.status !== 401 && err.status !== 0) {
        var named = new ApiError(err.code, err.message + ': ' + name, err.status);
        named.handled = err.handled;
        throw named;
      }
      throw err;
    });
  }

  // A typed user reference -> Promise of the user id. Digits alone are an id;
  // anything else is a username ("@name" forces a name, for all-digit names).
  // Rejects with an ApiError (client_invalid for an empty reference).
  function resolveUser(text) {
    var t = String(text).trim();
    if (!t || t === '@') {
      return Promise.reject(new ApiError('client_invalid', 'Enter a username or a user id', 0));
    }
    if (t.charAt(0) !== '@') {
      var id = parseId(t);
      if (id !== null) return Promise.resolve(id);
      if (/^\d+$/.test(t)) {
        return Promise.reject(new ApiError('client_invalid', 'Not a user id: ' + t + ' (for a username of digits, type @' + t + ')', 0));
      }
    } else {
      t = t.slice(1);
    }
    return lookUpUsername(t);
  }

  function renderMe() {
    el.me.textContent = state.me.username + ' (id ' + state.me.id + ')';
    el.me.setAttribute('data-user-id', String(state.me.id));
  }

  function startApp() {
    showApp();
    renderMe();
    loadConvs();
    renderConvList();
    var saved = ssGet('imserver.open.' + state.me.id);
    if (saved && state.convs.has(saved) && window.matchMedia('(min-width: 721px)').matches) {
      openConv(saved);
    } else {
      renderChat();
    }
    refreshGroups();
    connect();
    clearInterval(state.presenceTimer);
    state.presenceTimer = setInterval(function () {
      if (state.conn === 'online') refreshPresence();
    }, PRESENCE_EVERY_MS);
  }

  // ------------------------------------------------------------ conversations
  function storageKey() { return 'imserver.convs.' + state.me.id; }

  function makeConv(kind, id) {
    return {
      kind: kind,
      id: id,
      key: convKey(kind, id),
      name: null,           // groups: the group's name
      group: null,          // groups: the group object from the server
      unread: 0,
      lastTs: 0,            // sorts the list: newest activity first
      hasPreview: false,    // a last message is known (see touchConv)
      preview: '',          // the conversation's last message, shortened
      previewFrom: null,    // its sender's id (the name is looked up when shown)
      previewTs: 0,         // its time, shown in the list
      messages: new Map(),  // id -> msg
      pending: new Map(),   // cid -> msg (not yet acknowledged by `sent`)
      loaded: false,        // first history page fetched
      hasMore: true,
      loading: false,
    };
  }

  function ensureConv(kind, id) {
    var key = convKey(kind, id);
    var conv = state.convs.get(key);
    if (!conv) {
      conv = makeConv(kind, id);
      conv.lastTs = Date.now();
      state.convs.set(key, conv);
      saveConvs();
    }
    return conv;
  }

  function saveConvs() {
    if (!state.me) return;
    var out = [];
    state.convs.forEach(function (c) {
      out.push({ kind: c.kind, id: c.id, unread: c.unread, lastTs: c.lastTs, name: c.name });
    });
    lsSet(storageKey(), JSON.stringify(out));
  }

  function loadConvs() {
    state.convs = new Map();
    var list;
    try { list = JSON.parse(lsGet(storageKey()) || '[]'); } catch (e) { list = []; }
    if (!Array.isArray(list)) list = [];
    list.forEach(function (c) {
      if (!c || (c.kind !== 'user' && c.kind !== 'group') || !isPosInt(c.id)) return;
      var conv = makeConv(c.kind, c.id);
      conv.unread = Number(c.unread) || 0;
      conv.lastTs = Number(c.lastTs) || 0;
      conv.name = typeof c.name === 'string' ? c.name : null;
      state.convs.set(conv.key, conv);
    });
  }

  function convTitle(conv) {
    if (conv.kind === 'group') return conv.name || ('group ' + conv.id);
    return userName(conv.id);
  }

  function sortedConvs() {
    var arr = Array.from(state.convs.values());
    arr.sort(function (a, b) { return (b.lastTs - a.lastTs) || (a.key < b.key ? -1 : 1); });
    return arr;
  }

  function renderConvList() {
    var frag = document.createDocumentFragment();
    var totalUnread = 0;
    sortedConvs().forEach(function (conv) {
      totalUnread += conv.unread;
      var li = document.createElement('li');
      li.className = 'conversation' + (conv.key === state.openKey ? ' active' : '');
      li.setAttribute('data-kind', conv.kind);
      li.setAttribute('data-id', String(conv.id));
      li.setAttribute('data-testid', 'conversation-' + conv.kind + '-' + conv.id);
      li.setAttribute('role', 'button');
      li.tabIndex = 0;
      if (conv.key === state.openKey) li.setAttribute('aria-current', 'true');

      var avatar = document.createElement('span');
      if (conv.kind === 'user') {
        avatar.className = 'presence ' + presenceClass(conv.id);
        var on = state.presence[String(conv.id)];
        if (on !== undefined) avatar.setAttribute('data-online', on ? 'true' : 'false');
        avatar.title = on === undefined ? 'presence unknown' : (on ? 'online' : 'offline');
      } else {
        avatar.className = 'group-icon';
        avatar.textContent = '#';
        avatar.setAttribute('aria-hidden', 'true');
      }
      li.appendChild(avatar);

      var main = document.createElement('span');
      main.className = 'conv-main';
      var name = document.createElement('span');
      name.className = 'conv-name';
      name.textContent = convTitle(conv);
      var pv = document.createElement('span');
      pv.className = 'conv-preview';
      pv.textContent = conv.hasPreview ? previewText(conv) : (conv.kind === 'group'
        ? (conv.group ? conv.group.members.length + ' members' : 'group')
        : 'id ' + conv.id);
      main.appendChild(name);
      main.appendChild(pv);
      li.appendChild(main);

      var side = document.createElement('span');
      side.className = 'conv-side';
      var time = document.createElement('span');
      time.className = 'conv-time';
      time.textContent = conv.hasPreview ? fmtTime(conv.previewTs || conv.lastTs) : '';
      var badge = document.createElement('span');
      badge.className = 'unread';
      badge.setAttribute('data-count', String(conv.unread));
      badge.textContent = String(conv.unread);
      badge.hidden = conv.unread === 0;
      badge.setAttribute('aria-label', conv.unread + ' unread');
      side.appendChild(time);
      side.appendChild(badge);
      li.appendChild(side);
      frag.appendChild(li);
    });
    el.conversations.textContent = '';
    el.conversations.appendChild(frag);
    el.noConversations.hidden = state.convs.size > 0;
    document.title = (totalUnread ? '(' + totalUnread + ') ' : '') + 'imserver chat';
  }

  function presenceClass(uid) {
    var v = state.presence[String(uid)];
    return v === undefined ? 'unknown' : (v ? 'online' : 'offline');
  }

  function openConv(key) {
    var conv = state.convs.get(key);
    if (!conv) return;
    state.openKey = key;
    if (state.me) ssSet('imserver.open.' + state.me.id, key);
    if (conv.unread) { conv.unread = 0; saveConvs(); }
    el.layout.setAttribute('data-pane', 'chat');
    disarmLeave();
    renderConvList();
    renderChat(true);
    if (!conv.loaded) loadHistory(conv, true);
    setTimeout(function () { el.composer.focus(); }, 0);
  }

  function closeConv() {
    state.openKey = null;
    el.layout.setAttribute('data-pane', 'list');
    renderConvList();
    renderChat();
  }

  function openConvObj() { return state.openKey ? state.convs.get(state.openKey) : null; }

  // Call after `msg` was added to conv.messages or conv.pending.
  function touchConv(conv, msg) {
    conv.lastTs = Math.max(conv.lastTs, msg.ts || Date.now());
    // The preview is the last message of the conversation as the chat pane
    // shows it: the newest pending one, else the highest id. Not the latest
    // `ts` seen: a conversation created "now" by the first of several replayed
    // (older) messages would keep that first one, as would a client clock
    // ahead of the server's.
    var last = null;
    conv.pending.forEach(function (m) { if (!last || m.local > last.local) last = m; });
    if (!last) conv.messages.forEach(function (m) { if (!last || m.id > last.id) last = m; });
    if (!last) last = msg;
    conv.hasPreview = true;
    conv.preview = preview(last.body);
    conv.previewFrom = last.from;
    conv.previewTs = last.ts || 0;
  }

  // The list's preview line, with the sender's current name in groups.
  function previewText(conv) {
    var mine = state.me && conv.previewFrom === state.me.id;
    var who = conv.kind === 'group' ? (mine ? 'you' : userName(conv.previewFrom)) + ': ' : (mine ? 'you: ' : '');
    return who + conv.preview;
  }

  // ---------------------------------------------------------------- groups
  function applyGroup(g) {
    if (!g || !isPosInt(g.id)) return null;
    var conv = ensureConv('group', g.id);
    conv.group = {
      id: g.id,
      name: typeof g.name === 'string' ? g.name : '',
      owner: g.owner,
      members: Array.isArray(g.members) ? g.members.slice() : [],
    };
    conv.name = conv.group.name;
    return conv;
  }

  function refreshGroups() {
    return api('GET', '/api/groups').then(function (data) {
      var groups = data && Array.isArray(data.groups) ? data.groups : [];
      var seen = new Set();
      groups.forEach(function (g) {
        var c = applyGroup(g);
        if (c) seen.add(c.key);
      });
      // Groups we are no longer a member of go away.
      Array.from(state.convs.values()).forEach(function (c) {
        if (c.kind === 'group' && !seen.has(c.key) && c.pending.size === 0) {
          state.convs.delete(c.key);
          if (state.openKey === c.key) closeConv();
        }
      });
      saveConvs();
      renderConvList();
      if (openConvObj() && openConvObj().kind === 'group') renderChatHeader();
    }).catch(report);
  }

  function refreshGroup(gid) {
    return api('GET', '/api/groups/' + gid).then(function (g) {
      applyGroup(g);
      saveConvs();
      renderConvList();
      renderChatHeader();
    }).catch(report);
  }

  function onGroupCreate(ev) {
    ev.preventDefault();
    var name = el.groupName.value.trim();
    var parts = el.groupMembers.value.split(/[\s,;]+/).filter(function (s) { return s !== ''; });
    var me = state.me;
    el.groupCreate.disabled = true;
    // Members are usernames or ids; every name is looked up before anything is created.
    Promise.all(parts.map(resolveUser)).then(function (ids) {
      if (state.me !== me) return;   // logged out meanwhile
      var members = [];
      ids.forEach(function (id) { if (members.indexOf(id) < 0) members.push(id); });
      return api('POST', '/api/groups', { name: name, members: members }).then(function (g) {
        var conv = applyGroup(g);
        if (!conv) throw new ApiError('bad_response', 'The server answered an unexpected group', 201);
        conv.lastTs = Date.now();
        saveConvs();
        el.groupName.value = '';
        el.groupMembers.value = '';
        openConv(conv.key);
      });
    }).catch(report).then(function () { el.groupCreate.disabled = false; });
  }

  function onAddMember(ev) {
    ev.preventDefault();
    var conv = openConvObj();
    if (!conv || conv.kind !== 'group') return;
    el.addMember.disabled = true;
    resolveUser(el.addMemberId.value).then(function (id) {
      return api('POST', '/api/groups/' + conv.id + '/members', { user_id: id });
    }).then(function () {
      el.addMemberId.value = '';
      return refreshGroup(conv.id);
    }).catch(report).then(function () { el.addMember.disabled = false; });
  }

  function disarmLeave() {
    clearTimeout(state.leaveArmed);
    state.leaveArmed = null;
    el.leaveGroup.textContent = 'Leave group';
  }

  function onLeaveGroup() {
    var conv = openConvObj();
    if (!conv || conv.kind !== 'group') return;
    if (!state.leaveArmed) {
      el.leaveGroup.textContent = 'Click again to leave';
      state.leaveArmed = setTimeout(disarmLeave, 4000);
      return;
    }
    disarmLeave();
    api('DELETE', '/api/groups/' + conv.id + '/members/' + state.me.id).then(function () {
      state.convs.delete(conv.key);
      saveConvs();
      closeConv();
    }).catch(report);
  }

  // ---------------------------------------------------------------- new chat
  function onNewChat(ev) {
    ev.preventDefault();
    var text = el.newChatId.value.trim();
    if (!text) {
      showError('client_invalid', 'Enter a username or a user id');
      return;
    }
    var me = state.me;
    el.newChatOpen.disabled = true;
    resolveUser(text).then(function (id) {
      if (state.me !== me) return;   // logged out meanwhile
      if (id === me.id) {
        showError('client_invalid', 'That is you: messages to oneself are not allowed');
        return;
      }
      var existed = state.convs.has(convKey('user', id));
      var conv = ensureConv('user', id);
      if (!existed) conv.lastTs = Date.now();
      saveConvs();
      if (el.newChatId.value.trim() === text) el.newChatId.value = '';
      openConv(conv.key);
      refreshPresence();
    }).catch(report).then(function () { el.newChatOpen.disabled = false; });
  }

  // ---------------------------------------------------------------- presence
  function refreshPresence() {
    var ids = [];
    state.convs.forEach(function (c) { if (c.kind === 'user') ids.push(c.id); });
    if (!ids.length || !state.token) return;
    ids = ids.slice(0, 200);
    api('GET', '/api/presence?ids=' + ids.join(',')).then(function (data) {
      var online = data && data.online && typeof data.online === 'object' ? data.online : {};
      ids.forEach(function (id) {
        var v = online[String(id)];
        if (v !== undefined) state.presence[String(id)] = !!v;
      });
      renderConvList();
      renderChatHeader();
    }).catch(report);
  }

  // ------------------------------------------------------------ chat pane
  function renderChat(toBottom) {
    var conv = openConvObj();
    el.chatMain.hidden = !conv;
    el.chatEmpty.hidden = !!conv;
    if (!conv) {
      el.messageItems.textContent = '';
      return;
    }
    renderChatHeader();
    renderMessages(toBottom ? 'bottom' : 'auto');
  }

  function renderChatHeader() {
    var conv = openConvObj();
    if (!conv) return;
    el.chatTitle.textContent = convTitle(conv);
    if (conv.kind === 'user') {
      var on = state.presence[String(conv.id)];
      el.chatPresence.hidden = false;
      el.chatPresence.className = 'presence ' + presenceClass(conv.id);
      el.chatSubtitle.textContent = 'user id ' + conv.id + ' \u00b7 ' + (on === undefined ? 'presence unknown' : (on ? 'online' : 'offline'));
      el.groupAdmin.hidden = true;
    } else {
      el.chatPresence.hidden = true;
      var g = conv.group;
      if (g) {
        var names = g.members.map(function (m) {
          return userName(m) + (m === g.owner ? ' (owner)' : '');
        });
        el.chatSubtitle.textContent = 'group ' + conv.id + ' \u00b7 ' + g.members.length + ' members: ' + names.join(', ');
      } else {
        el.chatSubtitle.textContent = 'group ' + conv.id;
      }
      el.groupAdmin.hidden = false;
      var isOwner = g && g.owner === state.me.id;
      el.addMemberId.placeholder = isOwner ? 'username or id to add' : 'owner only: name or id';
    }
  }

  function convMessages(conv) {
    var stored = Array.from(conv.messages.values());
    stored.sort(function (a, b) { return a.id - b.id; });
    var pend = Array.from(conv.pending.values());
    pend.sort(function (a, b) { return a.local - b.local; });
    return stored.concat(pend);
  }

  function msgElement(msg) {
    if (msg._el) return msg._el;
    var div = document.createElement('div');
    var sender = document.createElement('div');
    sender.className = 'sender';
    var body = document.createElement('div');
    body.className = 'body';
    var meta = document.createElement('div');
    meta.className = 'meta';
    var time = document.createElement('span');
    time.className = 'time';
    var status = document.createElement('span');
    status.className = 'status';
    meta.appendChild(time);
    meta.appendChild(status);
    var err = document.createElement('div');
    err.className = 'message-error';
    var retry = document.createElement('button');
    retry.type = 'button';
    retry.className = 'retry link';
    retry.textContent = 'Retry';
    div.appendChild(sender);
    div.appendChild(body);
    div.appendChild(meta);
    div.appendChild(err);
    div.appendChild(retry);
    msg._el = div;
    return div;
  }

  function updateMsgElement(msg, conv) {
    var div = msgElement(msg);
    var mine = state.me && msg.from === state.me.id;
    div.className = 'message ' + (mine ? 'mine' : 'theirs') + ' ' + msg.status;
    if (msg.id != null) div.setAttribute('data-id', String(msg.id)); else div.removeAttribute('data-id');
    if (msg.cid) div.setAttribute('data-cid', msg.cid); else div.removeAttribute('data-cid');
    div.setAttribute('data-status', msg.status);
    div.setAttribute('data-from', String(msg.from));
    var parts = div.children;
    var sender = parts[0], body = parts[1], meta = parts[2], err = parts[3], retry = parts[4];
    var showSender = conv.kind === 'group' && !mine;
    sender.hidden = !showSender;
    sender.textContent = showSender ? userName(msg.from) : '';
    if (body.textContent !== msg.body) body.textContent = msg.body;
    meta.children[0].textContent = fmtTime(msg.ts);
    var st = '';
    if (mine) {
      if (msg.status === 'pending') st = state.conn === 'online' ? 'sending\u2026' : 'waiting for connection';
      else if (msg.status === 'sent') st = '\u2713 sent';
      else if (msg.status === 'error') st = 'not sent';
    }
    meta.children[1].textContent = st;
    err.hidden = msg.status !== 'error';
    err.textContent = msg.status === 'error' ? (msg.error || 'error') : '';
    retry.hidden = msg.status !== 'error';
    return div;
  }

  // mode: 'bottom' (scroll to end), 'auto' (stick to the end if already there),
  // 'keep' (history was prepended: keep the visible messages where they are)
  function renderMessages(mode) {
    var conv = openConvObj();
    if (!conv) return;
    var box = el.messages;
    var atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    var oldHeight = box.scrollHeight;
    var oldTop = box.scrollTop;

    var list = convMessages(conv);
    var container = el.messageItems;
    var wanted = new Set();
    var prev = null;
    list.forEach(function (msg) {
      var node = updateMsgElement(msg, conv);
      wanted.add(node);
      var expectedNext = prev ? prev.nextSibling : container.firstChild;
      if (expectedNext !== node) container.insertBefore(node, expectedNext);
      prev = node;
    });
    // Remove what is no longer part of this conversation (or another conversation's nodes).
    var child = container.firstChild;
    while (child) {
      var next = child.nextSibling;
      if (!wanted.has(child)) container.removeChild(child);
      child = next;
    }
    renderHistoryState(conv);

    if (mode === 'bottom' || (mode === 'auto' && atBottom)) {
      box.scrollTop = box.scrollHeight;
    } else if (mode === 'keep') {
      box.scrollTop = oldTop + (box.scrollHeight - oldHeight);
    }
    // Not enough to scroll? Fetch more so that scroll-up keeps working.
    if (conv.loaded && conv.hasMore && !conv.loading && box.scrollHeight <= box.clientHeight + 10) {
      loadHistory(conv, false);
    }
  }

  function renderHistoryState(conv) {
    el.loadOlder.hidden = !(conv.loaded && conv.hasMore && !conv.loading);
    if (conv.loading) el.historyText.textContent = 'Loading\u2026';
    else if (!conv.loaded) el.historyText.textContent = '';
    else if (!conv.hasMore) el.historyText.textContent = conv.messages.size ? 'Beginning of the conversation' : 'No messages yet';
    else el.historyText.textContent = '';
  }

  function oldestId(conv) {
    var min = null;
    conv.messages.forEach(function (m) { if (min === null || m.id < min) min = m.id; });
    return min;
  }

  function normalizeMsg(m, status) {
    return {
      id: m.id,
      from: m.from,
      to: m.to != null ? m.to : null,
      group: m.group != null ? m.group : null,
      body: typeof m.body === 'string' ? m.body : String(m.body),
      ts: m.ts,
      cid: m.cid != null ? m.cid : null,
      status: status,
      error: null,
      local: 0,
      _el: null,
    };
  }

  function loadHistory(conv, first) {
    if (conv.loading) return;
    if (conv.loaded && !conv.hasMore) return;
    conv.loading = true;
    if (openConvObj() === conv) renderHistoryState(conv);
    var q = (conv.kind === 'user' ? 'with=' : 'group=') + conv.id + '&limit=' + HISTORY_PAGE;
    var oldest = oldestId(conv);
    if (conv.loaded && oldest !== null) q += '&before=' + oldest;
    api('GET', '/api/messages?' + q).then(function (data) {
      conv.loading = false;
      if (state.convs.get(conv.key) !== conv) return;   // logged out / removed meanwhile
      var msgs = data && Array.isArray(data.messages) ? data.messages : [];
      var wasLoaded = conv.loaded;
      conv.loaded = true;
      conv.hasMore = !!(data && data.has_more);
      msgs.forEach(function (m) {
        if (!isPosInt(m.id) || conv.messages.has(m.id)) return;
        // Our own message still shown as pending (its `sent` not seen yet)?
        if (m.cid != null && m.from === state.me.id && conv.pending.has(m.cid)) {
          var p = conv.pending.get(m.cid);
          conv.pending.delete(m.cid);
          state.pendingByCid.delete(m.cid);
          p.id = m.id;
          p.ts = m.ts;
          p.status = 'sent';
          p.error = null;
          conv.messages.set(m.id, p);
          return;
        }
        var msg = normalizeMsg(m, m.from === state.me.id ? 'sent' : 'received');
        conv.messages.set(m.id, msg);
        touchConv(conv, msg);
      });
      if (msgs.length && !conv.hasPreview) touchConv(conv, msgs[msgs.length - 1]);
      renderConvList();
      if (openConvObj() === conv) renderMessages(wasLoaded ? 'keep' : 'bottom');
    }, function (err) {
      conv.loading = false;
      report(err);
      if (!conv.loaded && (err.status === 404 || err.status === 403) && conv.messages.size === 0 && conv.pending.size === 0) {
        // Unknown user / group, or not a member: drop the empty conversation.
        state.convs.delete(conv.key);
        saveConvs();
        if (state.openKey === conv.key) closeConv(); else renderConvList();
        return;
      }
      if (openConvObj() === conv) renderHistoryState(conv);
    });
  }

  function onMessagesScroll() {
    var conv = openConvObj();
    if (!conv || !conv.loaded || !conv.hasMore || conv.loading) return;
    if (el.messages.scrollTop < 60) loadHistory(conv, false);
  }

  // ---------------------------------------------------------------- sending
  function onComposerKey(ev) {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
      ev.preventDefault();
      submitComposer();
    }
  }

  function autosize() {
    el.composer.style.height = 'auto';
    el.composer.style.height = Math.min(el.composer.scrollHeight, 160) + 'px';
  }

  function submitComposer(ev) {
    if (ev) ev.preventDefault();
    var conv = openConvObj();
    if (!conv) return;
    var body = el.composer.value;
    if (body.trim() === '') return;
    el.composer.value = '';
    autosize();
    sendMessage(conv, body);
  }

  function sendMessage(conv, body) {
    var msg = normalizeMsg({ id: null, from: state.me.id, body: body, ts: Date.now(), cid: newCid() }, 'pending');
    msg.id = null;
    if (conv.kind === 'user') msg.to = conv.id; else msg.group = conv.id;
    msg.local = ++state.localCounter;
    conv.pending.set(msg.cid, msg);
    state.pendingByCid.set(msg.cid, { conv: conv, msg: msg });
    touchConv(conv, msg);
    transmit(msg);
    renderConvList();
    if (openConvObj() === conv) renderMessages('bottom');
  }

  function sendFrameFor(msg) {
    var frame = { type: 'send', cid: msg.cid };
    if (msg.group != null) frame.group = msg.group; else frame.to = msg.to;
    frame.body = msg.body;
    return JSON.stringify(frame);
  }

  // Sends a pending message if the socket is ready; otherwise it waits and goes
  // out (with the same cid, so the server stores it once) after the next `ready`.
  function transmit(msg) {
    var text = sendFrameFor(msg);
    if (utf8Length(text) >= MAX_FRAME_BYTES) {
      msg.status = 'error';
      msg.error = 'body_too_long: this message is too large to send';
      showError('body_too_long', 'This message is too large to send');
      return;
    }
    if (state.conn !== 'online') return;
    wsSendText(text);
  }

  function retryMessage(cid) {
    var entry = state.pendingByCid.get(cid);
    if (!entry) return;
    entry.msg.status = 'pending';
    entry.msg.error = null;
    transmit(entry.msg);
    if (openConvObj() === entry.conv) renderMessages('auto');
  }

  function onSent(f) {
    var entry = state.pendingByCid.get(f.cid);
    if (!entry) return;
    var conv = entry.conv, msg = entry.msg;
    state.pendingByCid.delete(f.cid);
    conv.pending.delete(f.cid);
    if (isPosInt(f.id)) {
      msg.id = f.id;
      if (f.ts) msg.ts = f.ts;
      msg.status = 'sent';
      msg.error = null;
      if (!conv.messages.has(f.id)) conv.messages.set(f.id, msg);
    }
    touchConv(conv, msg);
    if (openConvObj() === conv) renderMessages('auto');
    renderConvList();
  }

  function onErrorFrame(f) {
    var code = f.code || 'error';
    var message = f.message || '';
    if (f.cid != null && state.pendingByCid.has(f.cid)) {
      var entry = state.pendingByCid.get(f.cid);
      entry.msg.status = 'error';
      entry.msg.error = code + ': ' + message;
      if (openConvObj() === entry.conv) renderMessages('auto');
    }
    showError(code, message);
  }

  // ---------------------------------------------------------------- receiving
  function onMessageFrame(f) {
    trackSeq(f.seq);
    if (!isPosInt(f.id) || !state.me) return;
    var kind, id;
    if (f.group != null) {
      kind = 'group';
      id = f.group;
    } else {
      kind = 'user';
      id = f.from === state.me.id ? f.to : f.from;
    }
    if (!isPosInt(id)) return;
    var known = state.convs.has(convKey(kind, id));
    var conv = ensureConv(kind, id);
    if (conv.messages.has(f.id)) return;   // duplicate (at-least-once delivery)
    var msg;
    if (f.from === state.me.id && f.cid != null && conv.pending.has(f.cid)) {
      msg = conv.pending.get(f.cid);
      conv.pending.delete(f.cid);
      state.pendingByCid.delete(f.cid);
      msg.id = f.id;
      msg.ts = f.ts;
      msg.status = 'sent';
    } else {
      msg = normalizeMsg(f, f.from === state.me.id ? 'sent' : 'received');
    }
    conv.messages.set(f.id, msg);
    touchConv(conv, msg);
    var isOpen = state.openKey === conv.key;
    if (!isOpen && f.from !== state.me.id) conv.unread += 1;
    saveConvs();
    renderConvList();
    if (isOpen) renderMessages('auto');
    if (kind === 'group' && (!known || !conv.group)) refreshGroups();
    if (kind === 'user' && !known) refreshPresence();
  }

  // Cumulative acks: the highest seq below which every entry was received on
  // this connection. The server replays from its cursor + 1 in order, so the
  // first seq seen on a connection starts the contiguous run.
  function resetSeq() {
    state.seqContig = null;
    state.seqAbove = new Set();
    state.seqAcked = 0;
    clearTimeout(state.ackTimer);
    state.ackTimer = null;
  }

  function trackSeq(seq) {
    if (!isPosInt(seq)) return;
    if (state.seqContig === null) {
      state.seqContig = seq;
    } else if (seq === state.seqContig + 1) {
      state.seqContig = seq;
    } else if (seq > state.seqContig + 1) {
      state.seqAbove.add(seq);
    } else {
      return;   // already counted
    }
    while (state.seqAbove.has(state.seqContig + 1)) {
      state.seqAbove.delete(state.seqContig + 1);
      state.seqContig += 1;
    }
    if (!state.ackTimer) state.ackTimer = setTimeout(flushAck, ACK_DELAY_MS);
  }

  function flushAck() {
    state.ackTimer = null;
    if (state.seqContig === null || state.seqContig <= state.seqAcked) return;
    if (wsSendText(JSON.stringify({ type: 'ack', seq: state.seqContig }))) {
      state.seqAcked = state.seqContig;
    }
  }

  // ---------------------------------------------------------------- socket
  function setConn(s) {
    state.conn = s;
    el.connState.textContent = s;
    el.connState.setAttribute('data-state', s);
    el.connDot.className = 'conn-dot ' + s;
  }

  function showNotice(text, reason, countdown) {
    el.connNoticeText.textContent = text;
    el.connNotice.setAttribute('data-reason', reason);
    el.connNotice.hidden = false;
    clearInterval(state.countdownTimer);
    state.countdownTimer = null;
    if (countdown) {
      state.countdownTimer = setInterval(function () {
        var left = Math.max(0, Math.ceil((state.reconnectAt - Date.now()) / 1000));
        el.connNoticeText.textContent = 'Connection lost. Reconnecting in ' + left + ' s\u2026';
      }, 1000);
    }
  }

  function hideNotice() {
    el.connNotice.hidden = true;
    clearInterval(state.countdownTimer);
    state.countdownTimer = null;
  }

  function wsSendText(text) {
    var ws = state.ws;
    if (!ws || ws.readyState !== 1) return false;
    try { ws.send(text); return true; } catch (e) { return false; }
  }

  function closeSocket() {
    state.wsGen += 1;               // handlers of the old socket become no-ops
    clearInterval(state.pingTimer);
    state.pingTimer = null;
    clearTimeout(state.ackTimer);
    state.ackTimer = null;
    var ws = state.ws;
    state.ws = null;
    if (ws) {
      try { ws.close(1000, 'bye'); } catch (e) { /* ignore */ }
    }
  }

  function connect() {
    if (!state.token) return;
    closeSocket();
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    state.replaced = false;
    hideNotice();
    var gen = state.wsGen;
    setConn('connecting');
    var proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    var url = proto + '//' + location.host + '/ws?token=' + encodeURIComponent(state.token);
    var ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      showError('network_error', 'Could not open the WebSocket: ' + e.message);
      setConn('offline');
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    var opened = false;
    ws.onopen = function () {
      if (gen !== state.wsGen) return;
      opened = true;
      state.lastHeard = Date.now();
      resetSeq();
      clearInterval(state.pingTimer);
      state.pingTimer = setInterval(function () { heartbeat(gen); }, PING_EVERY_MS);
    };
    ws.onmessage = function (ev) {
      if (gen !== state.wsGen) return;
      state.lastHeard = Date.now();
      if (typeof ev.data !== 'string') return;
      var f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      if (!f || typeof f !== 'object') return;
      try {
        handleFrame(f);
      } catch (e) {
        if (window.console) console.error('frame handling failed', e, f);
      }
    };
    ws.onerror = function () { /* a close event follows */ };
    ws.onclose = function (ev) {
      if (gen !== state.wsGen) return;
      onSocketClosed(ev.code, ev.reason, opened);
    };
  }

  function heartbeat(gen) {
    if (gen !== state.wsGen) return;
    if (Date.now() - state.lastHeard > DEAD_AFTER_MS) {
      // Nothing heard (not even our pongs): the connection is dead.
      closeSocket();
      onSocketClosed(1006, 'timeout', true);
      return;
    }
    wsSendText(JSON.stringify({ type: 'ping' }));
  }

  function handleFrame(f) {
    switch (f.type) {
      case 'ready': onReady(f); break;
      case 'message': onMessageFrame(f); break;
      case 'sent': onSent(f); break;
      case 'error': onErrorFrame(f); break;
      case 'pong': break;
      default: break;   // unknown frames from a newer server: ignore
    }
  }

  function onReady(f) {
    if (state.me && isPosInt(f.user_id) && f.user_id !== state.me.id) {
      showError('client_error', 'The server says this connection is user ' + f.user_id + ', not ' + state.me.id);
    }
    setConn('online');
    state.backoffAttempt = 0;
    hideNotice();
    // Messages written while offline (or whose `sent` was lost) go out again with
    // their cid: the server answers the same id and stores nothing twice.
    state.pendingByCid.forEach(function (entry) {
      if (entry.msg.status === 'pending') transmit(entry.msg);
    });
    var conv = openConvObj();
    if (conv) renderMessages('auto');
    refreshPresence();
    refreshGroups();
  }

  function onSocketClosed(code, reason, opened) {
    state.ws = null;
    clearInterval(state.pingTimer);
    state.pingTimer = null;
    clearTimeout(state.ackTimer);
    state.ackTimer = null;
    setConn('offline');
    if (openConvObj()) renderMessages('auto');   // pending labels
    if (!state.token) return;
    if (code === CLOSE_REPLACED) {
      state.replaced = true;
      showNotice('This account was opened in another tab or window (replaced). Click Reconnect to use it here.', 'replaced', false);
      return;
    }
    if (code === 1009) {
      showError('frame_too_large', 'The server closed the connection: a frame was too large');
    }
    if (!opened) {
      // The handshake failed. A bad or expired token is refused with 401, which a
      // browser cannot see on a WebSocket: ask over HTTP (a 401 logs out).
      api('GET', '/api/me').then(function (me) {
        if (me && me.username && state.me && me.id === state.me.id && me.username !== state.me.username) {
          state.me.username = me.username;
          renderMe();
        }
        scheduleReconnect();
      }, function (err) {
        if (err.status === 401) return;   // authLost already logged out
        scheduleReconnect();
      });
      return;
    }
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (!state.token || state.replaced) return;
    clearTimeout(state.reconnectTimer);
    var base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, state.backoffAttempt));
    var delay = Math.min(BACKOFF_MAX_MS, Math.round(base * (0.8 + Math.random() * 0.4)));
    state.backoffAttempt = Math.min(state.backoffAttempt + 1, 10);
    state.reconnectAt = Date.now() + delay;
    showNotice('Connection lost. Reconnecting in ' + Math.ceil(delay / 1000) + ' s\u2026', 'retrying', true);
    state.reconnectTimer = setTimeout(function () {
      state.reconnectTimer = null;
      connect();
    }, delay);
  }

  function onReconnectClick() {
    state.backoffAttempt = 0;
    connect();
  }

  // ---------------------------------------------------------------- wiring
  function bind() {
    [
      'error', 'error-text', 'error-close', 'auth-view', 'auth-form', 'username', 'password',
      'login', 'register', 'app-view', 'me', 'conn-state', 'conn-dot', 'logout', 'conn-notice',
      'conn-notice-text', 'reconnect', 'layout', 'new-chat-form', 'new-chat-id', 'new-chat-open', 'group-box',
      'group-form', 'group-name', 'group-members', 'group-create', 'conversations',
      'no-conversations', 'chat-empty', 'chat-main', 'back', 'chat-presence', 'chat-title',
      'chat-subtitle', 'group-admin', 'add-member-id', 'add-member', 'leave-group', 'messages',
      'history-state', 'load-older', 'history-text', 'message-items', 'composer-form', 'composer', 'send',
    ].forEach(function (id) {
      var key = id.replace(/-([a-z])/g, function (_, c) { return c.toUpperCase(); });
      el[key] = $(id);
    });

    el.errorClose.addEventListener('click', clearError);
    el.authForm.addEventListener('submit', onLoginClick);
    el.register.addEventListener('click', onRegisterClick);
    el.logout.addEventListener('click', function () { logout(); });
    el.reconnect.addEventListener('click', onReconnectClick);
    el.newChatForm.addEventListener('submit', onNewChat);
    el.groupForm.addEventListener('submit', onGroupCreate);
    el.groupAdmin.addEventListener('submit', onAddMember);
    el.leaveGroup.addEventListener('click', onLeaveGroup);
    el.back.addEventListener('click', closeConv);
    el.loadOlder.addEventListener('click', function () {
      var conv = openConvObj();
      if (conv) loadHistory(conv, false);
    });
    el.messages.addEventListener('scroll', onMessagesScroll, { passive: true });
    el.composerForm.addEventListener('submit', submitComposer);
    el.composer.addEventListener('keydown', onComposerKey);
    el.composer.addEventListener('input', autosize);

    el.conversations.addEventListener('click', function (ev) {
      var li = ev.target.closest('.conversation');
      if (li) openConv(convKey(li.getAttribute('data-kind'), li.getAttribute('data-id')));
    });
    el.conversations.addEventListener('keydown', function (ev) {
      if (ev.key !== 'Enter' && ev.key !== ' ') return;
      var li = ev.target.closest('.conversation');
      if (li) {
        ev.preventDefault();
        openConv(convKey(li.getAttribute('data-kind'), li.getAttribute('data-id')));
      }
    });
    el.messageItems.addEventListener('click', function (ev) {
      var btn = ev.target.closest('.retry');
      if (!btn) return;
      var node = btn.closest('.message');
      if (node && node.getAttribute('data-cid')) retryMessage(node.getAttribute('data-cid'));
    });

    // Back online after a network outage: do not wait for the backoff timer.
    window.addEventListener('online', function () {
      if (state.token && state.conn === 'offline' && !state.replaced && state.reconnectTimer) onReconnectClick();
    });
    // Logged out in another tab: follow.
    window.addEventListener('storage', function (ev) {
      if (ev.key === LS_TOKEN && ev.newValue === null && state.token) logout();
      // Names another tab learnt.
      if (ev.key === LS_NAMES && mergeStoredNames()) scheduleNameRender();
    });
  }

  function boot() {
    bind();
    loadNames();
    setConn('offline');
    var token = lsGet(LS_TOKEN);
    var uid = parseId(lsGet(LS_UID) || '');
    var exp = expiryMs(lsGet(LS_EXPIRES));
    if (token && uid && (!exp || exp > Date.now())) {
      state.token = token;
      state.me = { id: uid, username: lsGet(LS_UNAME) || ('user ' + uid) };
      startApp();
      // Confirm the token and the exact username; a 401 logs out with an error.
      api('GET', '/api/me').then(function (me) {
        if (me && me.id === state.me.id && me.username) {
          state.me.username = me.username;
          lsSet(LS_UNAME, me.username);
          rememberName(me.id, me.username);
          renderMe();
        }
      }).catch(function (err) {
        if (err.status !== 401 && err.code !== 'network_error') report(err);
      });
    } else {
      if (token) {
        lsDel(LS_TOKEN);
        showError('token_expired', 'Your session expired \u2014 please log in again');
      }
      showAuth();
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
